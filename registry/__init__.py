"""The compartment registry in Redis, shared by the daemon (writes) and samplers (reads). Redis only: no Kafka,
no torch, no ``cdm``.

    config.py        RedisConfig (``[redis]``)            client.py        connect(): the one client factory
    keys.py          every key name under the namespace   records.py       typed records and their one codec
    reader.py        RegistryClient: snapshots, watch     writer.py        Registry: lifecycle, router, audit
    coordination.py  Coordinator: locks and heartbeats    scripts.py       the Lua scripts of lua/*.lua
    errors.py        RegistryError and its subclasses
"""
