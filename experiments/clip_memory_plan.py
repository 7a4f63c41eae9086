r"""Bytes per device of an EVA-CLIP contrastive training step under FSDP, from XLA's compiled memory
analysis (nothing allocated or run: fake CPU devices), as experiments/memory_plan.py does for
pretraining (whose step builder cannot express the two-tower step).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/clip_memory_plan.py \
      --model=eva01-clip-g/14 --batches=1024 --precision=float16 --remat=full --patch_dropout=0.5

The step: ClipModel forward (both towers, FLIP patch dropout), contrastive.clip_loss over the mesh
(gather-with-grad, local loss), gradients, and an Adam-family update (LAMB keeps the same m, v
state as AdamW: optax.lamb), fp32 master weights, parameters and optimizer state sharded by
parallel.state_shardings on mesh data=1, fsdp=N. Same caveats as memory_plan.py: XLA:CPU buffer
assignment, ~20-30% from a GPU's; parameter/optimizer bytes are exact.
"""
from __future__ import annotations

import argparse
import json
import time

GiB = 2 ** 30


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--model', default='eva01-clip-g/14')
  ap.add_argument('--batches', default='1024')
  ap.add_argument('--precision', default='float16')
  ap.add_argument('--remat', default='full')
  ap.add_argument('--patch_dropout', type=float, default=0.5)
  a = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from eva_jax import parallel
  from eva_jax.models import clip
  from eva_jax.training import contrastive

  n = jax.device_count()
  mesh = parallel.make_mesh(dict(data=1, fsdp=n, tensor=1))
  cfg = clip.clip_config(a.model, dtype=a.precision, remat=a.remat, patch_dropout=a.patch_dropout)
  abstract = clip.abstract(cfg)
  graphdef, state = nnx.split(abstract, nnx.Param)
  p_shard = nnx.to_pure_dict(parallel.state_shardings(state, mesh))
  params = nnx.to_pure_dict(state)
  tx = optax.lamb(1e-3, weight_decay=0.05)
  opt_abs = jax.eval_shape(tx.init, params)
  o_shard = parallel.opt_state_shardings(tx, opt_abs, p_shard, mesh)
  count = sum(x.size for x in jax.tree.leaves(params))

  def step(params, opt_state, images, tokens, key):
    def loss_fn(p):
      st = nnx.state(abstract, nnx.Param)
      nnx.replace_by_pure_dict(st, p)
      model = nnx.merge(graphdef, st)
      img, txt, scale, _ = model(images, tokens, patch_dropout_key=key)
      return contrastive.clip_loss(img, txt, scale, mesh=mesh)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rows = []
  for b in [int(x) for x in a.batches.split(',')]:
    gb = b * n
    s = cfg.vision.image_size
    img = jax.ShapeDtypeStruct((gb, s, s, 3), jnp.float32, sharding=parallel.batch_sharding(mesh, 4))
    tok = jax.ShapeDtypeStruct((gb, cfg.text.context_length), jnp.int32,
                               sharding=parallel.batch_sharding(mesh, 2))
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.time()
    with jax.set_mesh(mesh):
      compiled = jax.jit(step, in_shardings=(p_shard, o_shard, img.sharding, tok.sharding, None),
                         out_shardings=(p_shard, o_shard, None), donate_argnums=(0, 1)).lower(
                             params, opt_abs, img, tok, key).compile()
    m = compiled.memory_analysis()
    row = dict(model=a.model, devices=n, per_device_batch=b, precision=a.precision, remat=a.remat,
               patch_dropout=a.patch_dropout, params=int(count),
               args_gib=m.argument_size_in_bytes / GiB, temp_gib=m.temp_size_in_bytes / GiB,
               total_gib=(m.argument_size_in_bytes + m.output_size_in_bytes
                          - m.alias_size_in_bytes + m.temp_size_in_bytes) / GiB,
               compile_s=time.time() - t0)
    rows.append(row)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
