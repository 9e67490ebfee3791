"""Device meshes: construction, the logical-axis rules table, and the expert-parallel schedule."""
