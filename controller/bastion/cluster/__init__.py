"""A site's k3s cluster from its files: one plan per node (`plan`) and the built-in Flatcar + k3s
Butane template (`k3s.bu`); `cli` is `bastion cluster`."""
