"""Survey registry, standard feature schema, catalog mapping, image rendering and shard writing."""
