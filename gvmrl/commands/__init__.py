"""Sub-commands of the `gvmrl` CLI (see gvmrl.cli)."""
