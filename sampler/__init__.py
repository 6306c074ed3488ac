"""The sampler side: follows the registry and serves the composition it describes (no Kafka, no daemon).

    loader.py   CompositionLoader (snapshot -> verified, cached composition), load_live_composition (one-shot)
    live.py     LiveComposition (the hot-swapped composition a sampler serves), Composition
"""
