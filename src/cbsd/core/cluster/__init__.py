"""The cluster (docs/cluster.md): etcd holds which node owns each VM and which nodes are alive.
A layer between core.manage and core.hosts: bmove/bmigrate switch ownership through it."""
