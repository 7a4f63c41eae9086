"""`python -m eva_jax.finetune`: kept as an alias of `python -m eva_jax.cli.finetune` (eva-finetune)."""
if __name__ == '__main__':
  from eva_jax.cli.finetune import run
  run()
