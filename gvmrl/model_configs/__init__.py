"""Architecture configs (config.json shapes) of the paper's models, for `gvmrl plan` offline."""
