"""CPU speed benchmark: a small EVA-01 student (S/14 width, 6 blocks) + a CLIP-S/14 teacher at 112.

  python -m eva_jax.benchmark --config=configs/bench_cpu.py
  python experiments/torch_reference.py --preset=bench_cpu      # the same step in PyTorch

Student: width 384, depth 6, heads 6, MLP 1536, patch 14 on 112x112 (8x8 = 64 patches + cls).
Teacher: clip-S/14 (384, 6 blocks, 6 heads, 1536, projection 384). Batch 16, fp32, one device,
EVA block masking scaled to the 8x8 grid (26 of 64 patches ~ 41%, min block 4), remat 'dots_no_batch'.
Also a valid pretraining config (demo images) for `eva_jax.pretrain`.
"""
from eva_jax.defaults import pretrain_defaults


def get_config():
  c = pretrain_defaults(model='S/14', teacher='clip-S/14')
  c.model.depth = 6                  # S/14 is width 384, 6 heads, MLP 1536, patch 14
  c.model.drop_path = 0.1
  # Measured on 2 CPU cores: per-block remat keeping only the weight matmul outputs
  # ('dots_no_batch') is ~10-15% faster here than 'none' (fewer stacked scan residuals to zero-fill,
  # write and read back; 0.67 vs 0.81 s/step, 375 vs 559 MB), 'dots' is within noise of it; the
  # scanned stack beats scan_unroll=6 (XLA:CPU adds layout copies when unrolled; 2x compile time).
  # Re-measured after the split q/k/v projections (slower VM that hour): none 0.86 s / 542 MB,
  # dots 0.77 / 375, dots_no_batch 0.78 / 357, full 0.90 / 297.
  c.model.remat = 'dots_no_batch'
  c.model.scan_unroll = 1
  c.image_size = 112
  c.batch_size = 16
  c.precision = 'fp32'
  c.total_steps = 1000
  c.optim.warmup_steps = 10
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  c.data.source = 'demo'
  c.teacher.allow_random_init = True   # a random-init teacher on purpose (no download)
  c.data.workers = 0
  c.data.mask.num_masking_patches = 0   # the recipe ratio 105/256: 26 of 64 here, any size
  c.data.mask.min_num_patches = 4
  c.progress = False
  c.benchmark = dict(steps=10, warmup=2, input='synthetic')
  return c
