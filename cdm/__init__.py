"""cdm: Compartmentalized Diffusion Models (Golatkar et al. 2023) on PyTorch + diffusers.

The library is pure maths and training; all I/O with Kafka, Redis and HTTP lives in ``daemon/``.
"""

__version__ = "0.1.0"
