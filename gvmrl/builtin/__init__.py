"""The built-in task and model, which run everywhere without downloads.

- `gvmrl.builtin.task`: the synthetic multi-step arithmetic task with worked solutions;
- `gvmrl.builtin.model`: the character-level tokenizer, the tiny Qwen2 config and the shipped
  pretrained checkpoint (`weights/`);
- `gvmrl.builtin.pretrain`: its supervised warm start, which rebuilds that checkpoint.
"""
