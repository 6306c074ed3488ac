"""The sampler side: follows the registry and serves the composition it describes (no Kafka, no daemon).

loader.py      CompositionLoader (snapshot -> composition; artifacts fetched and verified through the
               content-addressed cache, cached by (id, sha256), pinned while served), load_live_composition
live.py        LiveComposition (the hot-swapped composition a sampler serves: a watcher that survives bad
               snapshots, fails closed, honours tombstones, and says whether it is alive and current)
forgetting.py  what tombstones refuse and which cached files they purge
metrics.py     SamplerMetrics (hot swap, registry watch, artifact loads and purges, sampling)
"""
