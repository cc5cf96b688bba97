"""The condition stage: raw tables -> conditioned flux partitions (partition I/O on top, numerics below)."""
