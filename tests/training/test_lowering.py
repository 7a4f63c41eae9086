"""Every training step lowered for GPU (`cuda`) and TPU (`tpu`) on this CPU machine, and the FSDP
program compiled for CPU: what the step will run on an accelerator, checked without owning one.

One subprocess with 8 fake CPU devices (`python tests/training/test_lowering.py`, the worker at the
bottom of this file) builds each step with the trainer's own code (`training/pretrain.py build`,
`training/finetune.py build`), traces it once on a mesh of fsdp=8 and lowers the trace for `cuda`
and `tpu` (`Traced.lower(lowering_platforms=...)`, what `jax.export(platforms=...)` does), then
compiles the pretraining step for CPU to see the collectives after SPMD partitioning. The tests
below assert on its JSON:
  (a) cuDNN attention: `model.attention='cudnn'` lowers to cuDNN's fused attention custom call
      (`__cudnn$fmha...`, forward and backward) on one device; on a multi-device mesh it is wrapped
      in jax's `CustomSPMDPartitioning` call (the cuDNN call appears after partitioning, inside
      XLA). 'auto' is jax's `implementation=None`, which in jax 0.10.2 always picks XLA.
  (b) bf16: every dot_general runs on bf16 operands; f32 only on XLA attention's softmax path
      (logits accumulated in f32, the logit gradient rounded to bf16 by the dot algorithm).
  (c) no host callback, infeed, outfeed, send or recv inside a step; every custom call is known.
  (d) FSDP: every weight with a model-width axis enters the step sharded over fsdp (the lowering's
      Shardy annotations); after partitioning (compiled for CPU) each scanned block all-gathers its
      weights in the forward and again in the backward loop and reduces its gradients inside the
      backward loop; the replicated teacher's loop has no collective.
Golden summaries (counts per op kind, tests/golden/lowering/*.txt) make a change in any of these a
readable diff. Regenerate after an intended change with
  EVA_JAX_REGEN_GOLDEN=1 pytest tests/training/test_lowering.py
A new training step (contrastive, video) is one entry in STEPS.

The worker pretends cuDNN 9.10 is installed (`fused_attention_stablehlo.cuda_versions`): jax checks
the library's presence when tracing the cuDNN path, not when lowering it, and this machine has none.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import support  # noqa: E402  (tests/support.py; conftest puts tests/ on sys.path under pytest)

GOLDEN = os.path.join(support.ROOT, 'tests', 'golden', 'lowering')
REGEN = os.environ.get('EVA_JAX_REGEN_GOLDEN') == '1'
PLATFORMS = ('cuda', 'tpu')
BATCH, IMAGE, FSDP = 16, 56, 8
# Custom calls a step may contain: jax's sharding markers and cuDNN attention. Anything else (host
# callbacks such as xla_python_cpu_callback / xla_ffi_python_gpu_callback, a debug print) fails (c).
KNOWN_CUSTOM_CALLS = ('Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape',
                      'CustomSPMDPartitioning', 'xla.sdy.GlobalToLocalShape',
                      'xla.sdy.LocalToGlobalShape', 'xla.sdy.FuncResultSharding')


# ------------------------------------------------------------------------------------------------
# Worker side (runs in the 8-device subprocess; imports jax only there).
def _base_config(model='tiny', teacher='clip-tiny', family='clip', **over):
  from eva_jax import defaults
  cfg = defaults.pretrain_defaults(model=model, teacher=teacher)
  cfg.teacher.family = family
  cfg.teacher.allow_random_init = True
  cfg.image_size, cfg.batch_size, cfg.precision = IMAGE, BATCH, 'bf16'
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, FSDP, 1
  # Pretraining runs the student's last block on the masked tokens only, outside the scan: depth 3
  # keeps a scanned loop of two blocks before it (a one-block scan is unrolled by jax).
  cfg.model.depth = 3
  for k, v in over.items():
    target = cfg
    *path, last = k.split('.')
    for p in path:
      target = target[p]
    target[last] = v
  return cfg


def _abstract(shape, dtype):
  import jax
  return jax.ShapeDtypeStruct(shape, dtype)


def pretrain_step(family, teacher, devices=None, **over):
  """(jitted train step, abstract args, expected fsdp-sharded args) of training/pretrain.py."""
  import jax
  import jax.numpy as jnp
  from eva_jax import parallel
  from eva_jax.training import pretrain
  cfg = _base_config(teacher=teacher, family=family, **over)
  mesh = parallel.make_mesh(cfg.mesh, devices=devices)
  task, scfg, tcfg = pretrain.build(cfg, mesh)
  teacher_params = jax.eval_shape(
      lambda: pretrain.random_teacher(tcfg, None, 0))
  g = (cfg.image_size // scfg.patch_size) ** 2
  batch = {'image': _abstract((BATCH, cfg.image_size, cfg.image_size, 3), jnp.float32),
           'mask': _abstract((BATCH, g), jnp.bool_)}
  return task, (task.abstract_state, teacher_params, batch)


def finetune_step(devices=None, **over):
  import jax.numpy as jnp
  from eva_jax import defaults, parallel
  from eva_jax.training import finetune
  cfg = defaults.finetune_defaults(model='tiny')
  cfg.image_size, cfg.batch_size, cfg.precision = IMAGE, BATCH, 'bf16'
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, FSDP, 1
  cfg.data.mixup = cfg.data.cutmix = 0.0
  mesh = parallel.make_mesh(cfg.mesh, devices=devices)
  task, _ = finetune.build(cfg, mesh, num_classes=10)
  batch = {'image': _abstract((BATCH, IMAGE, IMAGE, 3), jnp.float32),
           'label': _abstract((BATCH,), jnp.int32)}
  return task, (task.abstract_state, {}, batch)


def clip_step(devices=None, **over):
  """The contrastive (EVA-CLIP) step of training/clip.py: both towers, CLIP loss on the mesh."""
  import jax.numpy as jnp
  from eva_jax import defaults, parallel
  from eva_jax.training import clip
  cfg = defaults.clip_defaults('eva-clip-tiny')
  cfg.image_size, cfg.batch_size, cfg.precision = IMAGE, BATCH, 'bf16'
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, FSDP, 1
  mesh = parallel.make_mesh(cfg.mesh, devices=devices)
  task, mcfg = clip.build(cfg, mesh)
  batch = {'image': _abstract((BATCH, IMAGE, IMAGE, 3), jnp.float32),
           'text': _abstract((BATCH, mcfg.text.context_length), jnp.int32)}
  return task, (task.abstract_state, {}, batch)


def video_step(devices=None, **over):
  """The video fine-tuning step of training/video.py: joint space-time attention over T frames."""
  import jax.numpy as jnp
  from eva_jax import parallel
  from eva_jax.training import video
  cfg = video.video_finetune_defaults('tiny')
  cfg.image_size, cfg.batch_size, cfg.precision = IMAGE, BATCH, 'bf16'
  cfg.video.num_frames = 2
  cfg.model.attention = over.get('attention', cfg.model.attention)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, FSDP, 1
  cfg.data.mixup = cfg.data.cutmix = 0.0
  mesh = parallel.make_mesh(cfg.mesh, devices=devices)
  task, _ = video.build(cfg, mesh, num_classes=10)
  batch = {'video': _abstract((BATCH, 2, IMAGE, IMAGE, 3), jnp.float32),
           'label': _abstract((BATCH,), jnp.int32)}
  return task, (task.abstract_state, {}, batch)


# name -> () -> (task, abstract args of task.train_step). One entry per training step.
STEPS = {
    'pretrain_clip': lambda: pretrain_step('clip', 'clip-tiny'),
    'pretrain_eva_clip': lambda: pretrain_step('eva_clip', 'eva02-clip-tiny'),
    'pretrain_siglip': lambda: pretrain_step('siglip', 'siglip-tiny'),
    'pretrain_dinov2': lambda: pretrain_step('dinov2', 'dinov2-tiny'),
    'finetune': finetune_step,
    'contrastive': clip_step,
    'video': video_step,
}
# Scanned tower passes per step (student forward + backward, + teacher forward; two towers both
# ways for the contrastive step) and attention forwards (their f32 logits).
LOOPS = {'contrastive': 4, 'video': 2, 'finetune': 2}
# Attention forwards with f32 logits. Pretraining (default): student and teacher each have their
# scanned blocks and their last block, which runs on the masked tokens only (models/mim.py
# masked_first). The video recipe's remat='full' recomputes the student's inside the backward
# (one more), as its memory plan intends.
TOWERS = {'contrastive': 2, 'video': 2, 'finetune': 1}
# Attention programs with a backward: pretraining (default) the student's scanned blocks and its
# last block; the contrastive step both towers; fine-tuning and video the one scanned tower.
TRAINED = {'contrastive': 2, 'finetune': 1, 'video': 1}
# float32 matmuls we mean: the contrastive loss's similarity logits of the L2-normalized features
# (training/contrastive.py computes them in f32 on purpose: forward and backward).
LOSS_F32 = {'contrastive': 6}


def _fsdp_args(task, args) -> int:
  """How many leaves of the step's arguments the shardings put over the fsdp mesh axis."""
  import jax
  from jax.sharding import NamedSharding
  shardings = (task.state_shardings, task.consts_shardings,
               {k: None for k in args[2]})
  n = 0
  for sh in jax.tree.leaves(shardings[:2], is_leaf=lambda x: isinstance(x, NamedSharding)):
    n += any('fsdp' in (a if isinstance(a, tuple) else (a,)) for a in sh.spec if a)
  return n + len(args[2])   # the batch arrays are split over (data, fsdp)


def _targets(text):
  import re
  return sorted(set(re.findall(r'custom_call @([\w$.\-]+)', text)))


def _worker() -> dict:
  import jax
  from jax._src.cudnn import fused_attention_stablehlo as fa

  from eva_jax import benchmark

  class _CuDNN:   # what jax's check reads from the CUDA plugin; see the module docstring
    @staticmethod
    def cudnn_get_version():
      return 91000

  fa.cuda_versions = _CuDNN()
  assert jax.device_count() == FSDP, jax.devices()
  out = {'summaries': {}, 'fsdp_expected': {}, 'targets': {}}
  traced_clip = None
  for name, make in STEPS.items():
    task, args = make()
    traced = task.train_step.trace(*args)
    out['fsdp_expected'][name] = _fsdp_args(task, args)
    for platform in PLATFORMS:
      text = traced.lower(lowering_platforms=(platform,)).as_text()
      out['summaries'][f'{name}_{platform}'] = benchmark.stablehlo_summary(text)
      out['targets'][f'{name}_{platform}'] = _targets(text)
    if name == 'pretrain_clip':
      traced_clip = traced

  # (a) cuDNN attention. 42 px = 3x3 patches + cls = 10 tokens (even: no padding token).
  cudnn = {}
  one = jax.devices()[:1]
  for attention in ('cudnn', 'auto'):
    task, args = pretrain_step('clip', 'clip-tiny', devices=one, image_size=42,
                               **{'mesh.fsdp': 1, 'model.attention': attention})
    text = task.train_step.trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    cudnn[f'{attention}_one_device'] = _targets(text)
  task, args = pretrain_step('clip', 'clip-tiny', image_size=42, **{'model.attention': 'cudnn'})
  text = task.train_step.trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  cudnn['cudnn_fsdp8'] = benchmark.stablehlo_summary(text)
  # 56 px = 4x4 patches + cls = 17 tokens, odd like every recipe at 224 (257): layers.Attention
  # pads one masked token for cuDNN, so this lowers to the fused call too.
  task, args = pretrain_step('clip', 'clip-tiny', devices=one,
                             **{'mesh.fsdp': 1, 'model.attention': 'cudnn'})
  cudnn['cudnn_odd_tokens'] = _targets(
      task.train_step.trace(*args).lower(lowering_platforms=('cuda',)).as_text())
  # The video step's joint space-time attention (2 frames x 16 patches + cls = 33 tokens, odd;
  # 4,097 at g/14 x 16 x 224) takes the fused path too.
  task, args = video_step(attention='cudnn')
  cudnn['video_cudnn_fsdp8'] = benchmark.stablehlo_summary(
      task.train_step.trace(*args).lower(lowering_platforms=('cuda',)).as_text())
  out['cudnn'] = cudnn

  # (d) The FSDP program after SPMD partitioning: compiled for CPU, backend codegen at -O0 (the
  # partitioning is done before codegen; -O0 only makes compiling faster).
  compiled = traced_clip.lower().compile({'xla_backend_optimization_level': 0,
                                          'xla_llvm_disable_expensive_passes': True})
  out['collectives'] = benchmark.hlo_collectives(compiled.as_text())
  return out


# ------------------------------------------------------------------------------------------------
# Test side.
@pytest.fixture(scope='module')
def lowered():
  # ~25 s of CPU; the timeout leaves room for a heavily shared machine (load 30 on 2 cores: 630 s).
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=support.ENV8,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _golden(name: str, lines: list[str]) -> None:
  """Compares `lines` with tests/golden/lowering/NAME.txt (writes it with EVA_JAX_REGEN_GOLDEN=1)."""
  path = os.path.join(GOLDEN, f'{name}.txt')
  text = '\n'.join(lines) + '\n'
  if REGEN or not os.path.exists(path):
    os.makedirs(GOLDEN, exist_ok=True)
    with open(path, 'w') as f:
      f.write(text)
    if not REGEN:
      pytest.fail(f'{path} did not exist and was written; check it in (or run with '
                  'EVA_JAX_REGEN_GOLDEN=1).')
  with open(path) as f:
    want = f.read()
  assert text == want, (f'{name}: the lowered step changed; diff the summary below against {path} '
                        f'and regenerate with EVA_JAX_REGEN_GOLDEN=1 if intended:\n{text}')


def _summary_lines(summary: dict) -> list[str]:
  return [f'{k}: {v}' for k, v in summary.items()]


@pytest.mark.parametrize('name', list(STEPS))
def test_step_lowers_for_cuda_and_tpu(lowered, name):
  for platform in PLATFORMS:
    s = lowered['summaries'][f'{name}_{platform}']
    # The blocks run under lax.scan: one loop for the student forward and one for its backward
    # (+ one for the teacher's forward when pretraining), not one copy per block.
    assert s.get('while', 0) == LOOPS.get(name, 3), s
    _golden(f'{name}_{platform}', _summary_lines(s))
  # Nothing in this step is platform-specific (attention 'xla'): both lowerings agree.
  assert lowered['summaries'][f'{name}_cuda'] == lowered['summaries'][f'{name}_tpu']


@pytest.mark.parametrize('name', list(STEPS))
def test_bf16_matmuls(lowered, name):
  """(b) Every matmul runs on bf16 operands. The only f32 in sight is XLA attention's softmax
  path, by design: QK^T accumulates into f32 logits (one per attention program: TOWERS),
  and the backward multiplies the f32 logit gradient by K and by Q
  under the dot algorithm bf16 x bf16 -> f32 (the f32 operand is rounded to bf16 on the tensor
  cores). Loss, LayerNorm statistics and the lm_head/logits upcasts are elementwise (no matmul)."""
  for platform in PLATFORMS:
    s = lowered['summaries'][f'{name}_{platform}']
    dots = {k: v for k, v in s.items() if k.startswith('dot_general')}
    towers = TOWERS.get(name, 4)
    logits = 'dot_general bf16,bf16->f32 algorithm bf16,bf16->f32'
    logit_grads = 'dot_general f32,bf16->f32 algorithm bf16,bf16->f32'
    assert dots.get(logits) == towers, dots
    assert dots.get(logit_grads) == 2 * TRAINED.get(name, 2), dots
    assert dots.get('dot_general f32,f32->f32', 0) == LOSS_F32.get(name, 0), dots
    others = {k: v for k, v in dots.items()
              if k not in (logits, logit_grads, 'dot_general f32,f32->f32')}
    assert list(others) == ['dot_general bf16,bf16->bf16'] and others[
        'dot_general bf16,bf16->bf16'] > 20, dots


@pytest.mark.parametrize('name', list(STEPS))
def test_no_host_transfers(lowered, name):
  """(c) No callbacks to the host, infeed / outfeed / send / recv inside the step."""
  for platform in PLATFORMS:
    s = lowered['summaries'][f'{name}_{platform}']
    for op in ('infeed', 'outfeed', 'send', 'recv'):
      assert op not in s, (op, s)
    unknown = [t for t in lowered['targets'][f'{name}_{platform}'] if t not in KNOWN_CUSTOM_CALLS]
    assert not unknown, unknown


@pytest.mark.parametrize('name', list(STEPS))
def test_fsdp_shardings_survive_lowering(lowered, name):
  """(d, cuda/tpu) Every argument the trainer shards over fsdp is annotated so in the lowering."""
  s = lowered['summaries'][f'{name}_cuda']
  assert s['args sharded over fsdp'] == lowered['fsdp_expected'][name], s
  assert s['args sharded over fsdp'] > 20, s


def test_cudnn_attention_on_cuda(lowered):
  """(a) attention='cudnn' on cuda: cuDNN's fused attention forward and backward custom calls."""
  c = lowered['cudnn']
  fmha = [t for t in c['cudnn_one_device'] if t.startswith('__cudnn$fmha')]
  assert any('Backward' in t for t in fmha) and any('Backward' not in t for t in fmha), fmha
  # 'auto' = jax's implementation=None: XLA's attention in jax 0.10.2 (no cuDNN call).
  assert not any(t.startswith('__cudnn') for t in c['auto_one_device']), c['auto_one_device']
  # On a mesh the same calls sit inside jax's custom partitioning wrapper: forward + backward of
  # the student and the teacher's forward (the teacher runs the run's attention kernel too), each
  # for the scanned blocks and for the last block on the masked tokens.
  s = c['cudnn_fsdp8']
  assert s.get('custom_call CustomSPMDPartitioning') == 6, s
  _golden('pretrain_clip_cudnn_cuda', _summary_lines(s))


def test_video_attention_is_fused_on_cuda(lowered):
  """Issue 16: attention over all T*N space-time tokens uses cuDNN's fused kernel on cuda
  (forward, the remat recomputation and the backward, inside jax's partitioning wrapper)."""
  s = lowered['cudnn']['video_cudnn_fsdp8']
  assert s.get('custom_call CustomSPMDPartitioning') == 3, s


def test_cudnn_attention_with_odd_tokens(lowered):
  """jax 0.10.2 refuses cuDNN attention in training for an odd sequence length (17 here, 257 for
  every EVA recipe at 224); layers.Attention pads one masked token, so the fused forward and
  backward calls are there all the same."""
  fmha = [t for t in lowered['cudnn']['cudnn_odd_tokens'] if t.startswith('__cudnn$fmha')]
  assert any('Backward' in t for t in fmha) and any('Backward' not in t for t in fmha), fmha


def _backward(c) -> bool:
  return 'transpose(' in c['op_name']   # jax names the backward pass transpose(jvp(...))


def _by_loop(collectives):
  """{'forward' | 'backward' | 'other': {kind: count}} of the collectives inside scanned loops."""
  loops: dict = {}
  for c in collectives:
    if c['trips'] <= 1:
      continue
    side = 'backward' if _backward(c) else 'forward'
    loops.setdefault(c['computation'], {'side': side, 'kinds': {}})
    k = loops[c['computation']]['kinds']
    k[c['kind']] = k.get(c['kind'], 0) + 1
  return loops


def test_fsdp_collectives_per_block(lowered):
  """(d, compiled) Per scanned block: weights all-gathered in the forward loop and again in the
  backward loop, gradients reduced in the backward loop; the replicated teacher loop has none.

  XLA:CPU reduces gradients with all-reduce then keeps its shard (dynamic-slice): its pipeline has
  no reduce-scatter creation pass. The GPU and TPU pipelines (ReduceScatterCreator) turn exactly
  this pair into a reduce-scatter, so the count below is the reduce-scatter count there."""
  cs = lowered['collectives']
  loops = _by_loop(cs)
  fwd = [v['kinds'] for v in loops.values() if v['side'] == 'forward']
  bwd = [v['kinds'] for v in loops.values() if v['side'] == 'backward']
  assert len(fwd) == 1 and len(bwd) == 1, loops    # teacher loop: no collective at all
  fwd, bwd = fwd[0], bwd[0]
  # qkv (3 projections), proj, fc1, fc2 kernels + the 1-D embed-wide norms and biases.
  assert fwd.get('all-gather', 0) >= 6 and set(fwd) == {'all-gather'}, fwd
  assert bwd.get('all-gather', 0) >= 6, bwd
  assert bwd.get('all-reduce', 0) + bwd.get('reduce-scatter', 0) >= 1, bwd
  grads = sum(c['full_bytes'] for c in cs if c['trips'] > 1 and _backward(c)
              and c['kind'] in ('all-reduce', 'reduce-scatter'))
  # tiny block: qkv 64x3x64 + proj 64x64 + fc1/fc2 2x64x256 (+ biases, norms), f32 gradients.
  assert grads >= 4 * (4 * 64 * 64 + 2 * 64 * 256), grads
  lines = []
  for v in sorted(loops.values(), key=lambda v: v['side'] != 'forward'):
    lines += [f"{v['side']} loop {k}: {n}" for k, n in sorted(v['kinds'].items())]
  outside = {}
  for c in cs:
    if c['trips'] <= 1:
      outside[c['kind']] = outside.get(c['kind'], 0) + 1
  lines += [f'outside loops {k}: {n}' for k, n in sorted(outside.items())]
  _golden('pretrain_clip_fsdp8_cpu_collectives', lines)


if __name__ == '__main__':
  print(json.dumps(_worker()), flush=True)
