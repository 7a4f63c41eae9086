"""Contrastive image-text training (EVA-CLIP; ../shared/EVA-SPEC.md "EVA-CLIP", arXiv 2303.15389).

A ClipModel (models/clip.py: EVA image tower + CLIP text tower) trained with the CLIP InfoNCE loss
over the global batch (`--gather-with-grad --local-loss`) or SigLIP's sigmoid loss
(training/contrastive.py), FLIP patch dropout keyed per step, and the EVA-CLIP optimizer: LAMB or
AdamW with lr, weight decay and layer decay per tower (training/optim.py make_tower_optimizer).
Initialization (`config.init`): the image tower from an EVA encoder (an eva_jax MIM or fine-tuning
workdir, a timm / official EVA file; lm_head, mask_token and head skipped), the text tower from a
transformers CLIP directory, an OpenAI .pt or an open_clip file (convert/clip_text.py). Evaluation
(every config.eval_every steps and at the end): zero-shot top-1/5 on a labelled image folder with
class names x templates, image<->text recall@1/5/10 on a pair set (evaluation/zero_shot.py).

Everything else (mesh, restore-or-init, loop, checkpoints, SIGTERM, logging) is the trainer
skeleton's (training/trainer.py).
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eva_jax.models import clip as clip_lib
from eva_jax.models import config as model_config
from eva_jax.training import checks, contrastive, precision
from eva_jax.training import task as task_lib, trainer

LOSSES = ('clip', 'siglip')
# Range rules of the numeric fields only contrastive configs have (training/checks.py's table
# format; checks.RULES has no 'clip' kind yet, so ClipProgram.validate applies these itself).
TEMPLATES = ('demo', 'openai', 'simple')


def clip_model_config(cfg) -> ml_collections.ConfigDict:
  """The resolved ClipModel config: config.model.name, then config.vision / config.text overrides,
  then what the run owns (config.image_size, the compute dtype of config.precision, the loss:
  SigLIP adds the logit bias). Raises ValueError naming the field."""
  m = cfg.model
  out = clip_lib.clip_config(
      m.name, dtype=precision.compute_dtype(cfg.precision), remat=m.get('remat', 'none'),
      patch_dropout=float(m.patch_dropout), logit_bias=cfg.loss == 'siglip', pool=m.pool)
  for section in ('vision', 'text'):
    for k, v in (cfg.get(section) or {}).items():
      if v is None:
        continue
      if k not in out[section]:
        raise ValueError(f'config.{section}.{k} is not a {section} tower field.')
      out[section][k] = v
  if cfg.image_size:   # 0: the tower's own size
    model_config.set_run_image_size(out.vision, cfg.image_size)
  clip_lib.validate(out)
  return out


def build(cfg, mesh):
  """(Task, ClipModel config) of contrastive training on `mesh`."""
  mcfg = clip_model_config(cfg)
  loss_name = cfg.loss

  def make_model(seed):
    return clip_lib.ClipModel(mcfg, rngs=nnx.Rngs(params=jax.random.key(seed)))

  def loss_fn(model, consts, batch, key):
    k_patch, k_drop = jax.random.split(key)
    img, txt, scale, bias = model(batch['image'], batch['text'], patch_dropout_key=k_patch,
                                  dropout_key=k_drop)
    if loss_name == 'siglip':
      loss = contrastive.siglip_loss(img, txt, scale, bias, mesh=mesh)
    else:
      loss = contrastive.clip_loss(img, txt, scale, bias, mesh=mesh)
    return loss, {'logit_scale': scale}

  def eval_fn(model, consts, batch):   # the held-out contrastive loss of one batch (a sum)
    img, txt, scale, bias = model(batch['image'], batch['text'])
    fn = contrastive.siglip_loss if loss_name == 'siglip' else contrastive.clip_loss
    return {'loss': fn(img, txt, scale, bias, mesh=mesh) * img.shape[0],
            'count': jnp.asarray(img.shape[0], jnp.float32)}

  task = task_lib.build(
      cfg, mesh, make_model=make_model, loss_fn=loss_fn, eval_fn=eval_fn,
      batch_ndims={'image': 4, 'text': 2}, eval_batch_ndims={'image': 4, 'text': 2},
      depth=mcfg.vision.depth)
  return task, mcfg


def encoders(task, params, batch_size: int):
  """(encode_image, encode_text): host numpy in, float32 numpy [N, E] out (not normalized), any N.
  Inputs are zero-padded to multiples of `batch_size` so each encoder compiles once. `task`: a
  Task, or anything with its graphdef, template and mesh (eval_model)."""
  graphdef, template, mesh = task.graphdef, task.template, task.mesh

  def image_fn(p, x):
    return task_lib.merge_pure(graphdef, template, p).encode_image(x)

  def text_fn(p, t):
    return task_lib.merge_pure(graphdef, template, p).encode_text(t)

  jitted = {k: jax.jit(task_lib.under_mesh(mesh, f)) for k, f in (('image', image_fn),
                                                                  ('text', text_fn))}

  def padded(kind):
    def encode(x):
      x = np.asarray(x)
      out = []
      for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
          chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:],
                                                  chunk.dtype)])
        out.append(np.asarray(jax.device_get(jitted[kind](params, chunk)), np.float32)[:n])
      return np.concatenate(out)
    return encode

  return padded('image'), padded('text')


def _demo_root(spec: str, data_cfg) -> str:
  from eva_jax.data import demo
  return os.path.join(demo.ensure_demo_pairs(data_cfg.get('cache_dir', '')), spec.partition(':')[2]
                      or 'val')


def zero_shot_folder(spec: str, data_cfg) -> str:
  """The labelled image folder of config.eval.zero_shot ('demo:val' | 'folder:DIR' | 'DIR')."""
  if spec.startswith('demo'):
    return _demo_root(spec, data_cfg)
  path = spec.partition(':')[2] if spec.startswith('folder:') else spec
  if not os.path.isdir(path):
    raise FileNotFoundError(f'config.eval.zero_shot={spec!r}: {path} is not a folder of class '
                            'sub-folders (folder:DIR).')
  return path


def open_zero_shot_folder(root: str):
  """data/sources.py FolderSource of the zero-shot folder, listed once for both the class names
  and the loader; ValueError naming config.eval.zero_shot when it holds no images."""
  from eva_jax.data import sources
  try:
    return sources.FolderSource(root)
  except ValueError:
    raise ValueError(f'config.eval.zero_shot: no images under {root}; give a folder with one '
                     'sub-folder of images per class.') from None


def class_names(eval_cfg, folder) -> list[str]:
  """config.eval.classnames for `folder` (open_zero_shot_folder): '' = the demo's names when it
  is the demo set, else the class folder names ('_' -> ' '); 'imagenet' = open_clip's 1000
  ImageNet names; or a sequence.

  The names follow the labels the folder: source gives (data/sources.py FolderSource: the sorted
  class folders that hold images; an empty class folder takes no label). Given one name per class
  folder, empty ones included, the names of the empty folders are left out, with a warning naming
  them; otherwise the count must equal the labelled classes'. ValueError on any other count."""
  from eva_jax.data import demo
  from eva_jax.evaluation import zero_shot
  given = eval_cfg.classnames
  root, classes = folder.root, folder.classes
  # Hidden folders (.ipynb_checkpoints) are no classes, as the folder walk skips them too.
  folders = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
  empty = [f for f in folders if f not in classes]
  if isinstance(given, (tuple, list)) and given:
    names = list(given)
  elif given == 'imagenet':
    names = list(zero_shot.imagenet_metadata()['classnames'])
  elif given:
    raise ValueError(f"config.eval.classnames={given!r}: use '', 'imagenet' or a tuple of names.")
  elif all(c in demo.CLASSNAMES for c in classes):
    return [demo.CLASSNAMES[c] for c in classes]
  else:
    return [c.replace('_', ' ') for c in classes]
  if empty and len(names) == len(folders) != len(classes):
    dropped = [n for f, n in zip(folders, names) if f in empty]
    logging.warning('%s: class folders %s hold no image and take no label; their names %s are '
                    'left out of the zero-shot classes.', root, empty, dropped)
    names = [n for f, n in zip(folders, names) if f not in empty]
  if len(names) != len(classes):
    note = f' (empty, no label: {", ".join(empty)})' if empty else ''
    raise ValueError(f'{len(names)} class names were given but {root} holds {len(classes)} class '
                     f'folders with images{note}; give one name per such folder, in sorted order.')
  return names


def templates(eval_cfg) -> tuple[str, ...]:
  from eva_jax.data import demo
  from eva_jax.evaluation import zero_shot
  t = eval_cfg.templates
  if isinstance(t, (tuple, list)):
    return tuple(t)
  if t == 'demo':
    return demo.ZERO_SHOT_TEMPLATES
  if t in ('openai', 'simple'):
    return zero_shot.imagenet_metadata()[f'{t}_templates']
  raise ValueError(f'config.eval.templates={t!r} must be one of {TEMPLATES} or a tuple of '
                   "format strings with one '{}'.")


def eval_model(mcfg, mesh=None):
  """What `encoders` needs of a Task (graphdef, template, mesh) for a ClipModel config, without an
  optimizer: for evaluating a checkpoint (eva-zero-shot)."""
  import types
  from eva_jax import parallel
  graphdef, template = task_lib.split_abstract(
      lambda seed: clip_lib.ClipModel(mcfg, rngs=nnx.Rngs(params=seed)))
  mesh = mesh or parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  return types.SimpleNamespace(graphdef=graphdef, template=template, mesh=mesh)


def load_checkpoint(path: str, weights: str = 'auto') -> tuple[ml_collections.ConfigDict, dict, str]:
  """(ClipModel config, host params, description) of an eva_jax CLIP run (workdir or checkpoint
  folder; its metadata records the model). Raises FileNotFoundError, or ValueError for a
  checkpoint of another kind (pretraining, fine-tuning)."""
  from eva_jax import checkpoint as ckpt_lib
  params, meta, step = ckpt_lib.restore_params(path, weights=weights)
  if meta.get('kind') != ClipProgram.kind or 'clip' not in meta:
    raise ValueError(f'{path} holds a checkpoint of kind {meta.get("kind") or "unknown"!r}, not of '
                     'an EVA-CLIP run (eva-clip); zero-shot evaluation needs both towers.')
  mcfg = ml_collections.ConfigDict(meta['clip'])
  return mcfg, params, f'{path} (step {step})'


def evaluate_params(task, params, cfg, mcfg) -> dict:
  """Zero-shot top-1/5 and retrieval recall@1/5/10 of `params` as one flat dict (empty sections
  skipped): 'zero_shot/top1', 'zero_shot/top5', 'retrieval/image_to_text_R@k', ..."""
  from eva_jax.data import pairs, pipeline
  from eva_jax.evaluation import zero_shot
  ev = cfg.eval
  encode_image, encode_text = encoders(task, params, int(ev.batch_size))
  tokenize = None
  batches, names, temps, retrieval = None, (), (), None
  loader = None
  try:
    if ev.zero_shot:
      root = zero_shot_folder(ev.zero_shot, cfg.data)
      folder = open_zero_shot_folder(root)
      names, temps = class_names(ev, folder), templates(ev)
      data_cfg = cfg.data.copy_and_resolve_references()
      data_cfg.source, data_cfg.mixture = f'folder:{root}', ()
      loader = pipeline.build_classification_loader(
          data_cfg, image_size=cfg.image_size, batch_size=int(ev.batch_size), seed=cfg.seed,
          train=False, num_classes=len(names), sources=[(folder, 1.0)])
      batches = loader
    if ev.retrieval:
      retrieval = pairs.load_retrieval_set(
          ev.retrieval, cfg.data, image_size=cfg.image_size,
          context_length=mcfg.text.context_length, limit=int(ev.limit))
    if mcfg.text.context_length != 77:
      from eva_jax.data.tokenizer import tokenize as tok
      tokenize = lambda texts: tok(texts, mcfg.text.context_length)   # noqa: E731
    return zero_shot.evaluate(encode_image, encode_text, classifier_batches=batches,
                              classnames=names, templates=temps, retrieval=retrieval,
                              batch_size=int(ev.batch_size), tokenize=tokenize)
  finally:
    if loader is not None:
      loader.close()


class ClipProgram(trainer.Program):
  kind = 'eva_clip'
  config_kind = 'clip'
  init_fields = ('init',)

  def validate(self):
    cfg = self.cfg
    if cfg.loss not in LOSSES:
      raise ValueError(f'config.loss={cfg.loss!r} must be one of {", ".join(LOSSES)}.')
    if cfg.optim.get('name', 'adamw') not in ('lamb', 'adamw'):
      raise ValueError(f"config.optim.name={cfg.optim.name!r} must be 'lamb' or 'adamw'.")
    self.validate_eval()
    self.model_cfg = clip_model_config(cfg)   # a bad model name / override fails here
    contrastive.warn_if_small_batch(int(cfg.batch_size), f'config.batch_size={cfg.batch_size}: the '
                            f'{cfg.loss} loss')

  def validate_eval(self):
    """Checks of config.eval (also used by eva-zero-shot). Raises ValueError naming the field."""
    ev = self.cfg.eval
    for path in ('eval.batch_size', 'eval.limit'):
      checks.RULES['clip'][path].check(f'config.{path}', self.cfg.eval[path.split('.')[1]])
    if not isinstance(ev.templates, (tuple, list)) and ev.templates not in TEMPLATES:
      raise ValueError(f'config.eval.templates={ev.templates!r} must be one of '
                       f'{", ".join(TEMPLATES)} or a tuple of format strings.')

  def build(self, mesh):
    task, self.model_cfg = build(self.cfg, mesh)
    return task

  def open_train_sources(self):
    from eva_jax.data import pairs
    return pairs.open_pair_sources(self.cfg.data)

  def train_loader(self, task):
    from eva_jax.data import pairs
    return pairs.build_pair_loader(
        self.cfg.data, image_size=self.cfg.image_size, batch_size=trainer.per_host_batch(self.cfg),
        seed=self.cfg.seed, train=True, context_length=self.model_cfg.text.context_length,
        sources=self.train_sources())

  def init_state(self, task):
    cfg = self.cfg
    state = task.init(cfg.seed)
    is_main = jax.process_index() == 0
    random_init = [f'{tower} tower' for tower, path in (('image', cfg.init.image),
                                                          ('text', cfg.init.text)) if not path]
    if random_init and is_main:   # said, so that a forgotten init is seen at the start
      print(f'{" and ".join(random_init).capitalize()}: random init (config.init.'
            f'{" / ".join(t.split()[0] for t in random_init)} not set).', flush=True)
    if not (cfg.init.image or cfg.init.text):
      return state
    from eva_jax.convert import clip_text
    from eva_jax.convert.eva_torch import FACT_FIELDS
    model = task.model(jax.tree.map(np.asarray, jax.device_get(state.params)))
    if cfg.init.image:
      v = self.model_cfg.vision
      report = clip_text.load_image_tower(model, cfg.init.image,
                                          weights=cfg.init.get('image_weights', 'auto'),
                                          patch_resample=cfg.init.get('patch_resample', 'bicubic'),
                                          facts={k: v[k] for k in FACT_FIELDS if k in v})
      if is_main:
        print(f"Image tower from {report['source']}; skipped: "
              f"{', '.join(report['skipped']) or 'nothing'}; kept at init: "
              f"{', '.join(report['kept_init'])}.", flush=True)
    if cfg.init.text:
      t = self.model_cfg.text
      w = clip_text.load_text_tower(model, cfg.init.text, act=t.act, heads=t.heads)
      if is_main:
        print(f'Text tower from {w.source} (width {w.config.width}, depth {w.config.depth}); '
              f'logit_scale {"loaded" if "logit_scale" in w.extra else "kept at init"}.',
              flush=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return task.with_params(state, jax.tree.map(jax.device_put, params, task.param_shardings))

  def evaluate(self, task, state, consts, step):
    rec = evaluate_params(task, task.eval_params(state), self.cfg, self.model_cfg)
    if jax.process_index() == 0 and rec:
      print(f'step {step} ' + ' '.join(f'{k} {v}' if isinstance(v, int) else f'{k} {v:.4f}'
                                       for k, v in rec.items()), flush=True)   # counts as ints
    return rec

  def meta(self, task):
    return {'kind': self.kind, 'clip': self.model_cfg.to_dict()}

  def resolved(self, task):
    return {'clip': self.model_cfg.to_dict()}


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) contrastive training in `workdir`; returns the last logged metrics."""
  logging.info('EVA-CLIP training in %s', workdir)
  return trainer.run(ClipProgram(cfg), workdir)
