"""The built-in task and model, which run everywhere without downloads.

- `gvmrl.builtin.task`: the synthetic multi-step arithmetic task with worked solutions;
- `gvmrl.builtin.model`: the character-level tokenizer and the tiny Qwen2 config;
- `gvmrl.builtin.pretrain`: its supervised warm start and the cached checkpoint.
"""
