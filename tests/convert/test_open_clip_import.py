"""Import of open_clip EVA-CLIP files (eva_jax.convert.open_clip_import) against a random-init
open_clip model built here: bare, {'state_dict'} with module. prefixes, and safetensors files give
the same parameters; image / text features and logit_scale match open_clip < 1e-4 (fp32); the
zero-shot logits of our evaluation code match open_clip's build_zero_shot_classifier; a config of
another architecture is an error naming both values; eva-zero-shot reads such a file."""
import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_support
import support
from eva_jax.convert import open_clip_export, open_clip_import
from eva_jax.convert.common import CheckpointError
from eva_jax.evaluation import zero_shot
from eva_jax.models import clip

torch = pytest.importorskip('torch')
open_clip = pytest.importorskip('open_clip')

# eva02 (unfused q/k/v, SwiGLU, sub-LN, RoPE) at the demo set's 112 px, so the CLI reads the file.
NAME, IMAGE = 'eva02-clip-tiny', 112


def _config(**text):
  cfg = clip.clip_config(NAME, image_size=IMAGE)
  for k, v in text.items():
    cfg.text[k] = v
  return cfg


@pytest.fixture(scope='module')
def ref(tmp_path_factory):
  """The open_clip model, its three files and its features on random images / tokens."""
  from safetensors.torch import save_file
  tmp = tmp_path_factory.mktemp('open_clip_import')
  cfg = _config()
  torch.manual_seed(0)
  oc = open_clip.create_model(clip_support.register_open_clip(cfg, tmp, 'import_eva02'),
                              pretrained=None).eval()
  with torch.no_grad():   # non-trivial norms and biases so every tensor is tested
    for n, p in oc.named_parameters():
      if n.endswith('bias') or 'norm' in n or n.startswith('text.ln'):
        p.add_(0.1 * torch.randn_like(p))
    # timm's Eva scales its head init by 1e-3: features of O(1e-4) would make 1e-4 meaningless.
    oc.visual.trunk.head.weight.normal_(0.0, cfg.vision.width ** -0.5)
    oc.logit_scale.fill_(2.5)
  sd = oc.state_dict()
  files = {}
  for form in ('bare', 'train', 'safetensors'):
    (tmp / form).mkdir()
  files['bare'] = tmp / 'bare' / 'open_clip_pytorch_model.bin'
  torch.save(sd, files['bare'])
  files['train'] = tmp / 'train' / 'epoch_3.pt'
  torch.save({'epoch': 3, 'name': 'run', 'state_dict': {f'module.{k}': v for k, v in sd.items()}},
             files['train'])
  files['safetensors'] = tmp / 'safetensors' / 'open_clip_model.safetensors'
  save_file({k: v.contiguous() for k, v in sd.items()}, str(files['safetensors']))
  images, tokens, want_i, want_t = clip_support.open_clip_features(oc, IMAGE)
  model = clip.abstract(cfg)
  open_clip_import.load_open_clip(model, files['bare'])
  return types.SimpleNamespace(cfg=cfg, oc=oc, files=files, images=images, tokens=tokens,
                               want_i=want_i, want_t=want_t, model=model, tmp=tmp)


def test_all_forms_load_and_match_open_clip(ref):
  bare = open_clip_import.read_open_clip(ref.files['bare'], ref.cfg)
  for form in ('train', 'safetensors'):
    other = open_clip_import.read_open_clip(ref.files[form], ref.cfg)
    assert sorted(other) == sorted(bare), form
    for k, v in bare.items():
      np.testing.assert_array_equal(other[k], v, err_msg=f'{form} {k}')
  got_i, got_t = jax.jit(lambda m, x, t: (m.encode_image(x), m.encode_text(t)))(
      ref.model, ref.images, jnp.asarray(ref.tokens, jnp.int32))
  assert ref.want_i.std() > 0.1 and ref.want_t.std() > 0.1   # features of O(1)
  err_i = np.abs(np.asarray(got_i) - ref.want_i).max()
  err_t = np.abs(np.asarray(got_t) - ref.want_t).max()
  print(f'open_clip import parity: image {err_i:.2e}, text {err_t:.2e}')
  assert err_i < 1e-4 and err_t < 1e-4
  assert abs(float(ref.model.logit_scale[...]) - ref.oc.logit_scale.item()) < 1e-6
  # eva-zero-shot's --checkpoint: a file, or a hub download folder (safetensors preferred).
  st = ref.files['safetensors']
  assert open_clip_import.open_clip_file(st.parent) == str(st)
  assert open_clip_import.open_clip_file(ref.files['bare'].parent) == str(ref.files['bare'])
  assert open_clip_import.open_clip_file(ref.tmp) is None   # e.g. an eva-clip run directory
  # open_clip's own names resolve to our configs.
  assert open_clip_import.clip_config_for('EVA02-B-16').name == 'eva02-clip-B/16'


def test_zero_shot_logits_match_open_clip(ref):
  classnames = ['cat', 'dog', 'tree', 'car']
  templates = ['a photo of a {}.', 'a drawing of a {}.']
  encode_text = jax.jit(lambda m, t: m.encode_text(t))
  ours = zero_shot.build_zero_shot_classifier(
      lambda t: np.asarray(encode_text(ref.model, jnp.asarray(t, jnp.int32))), classnames,
      templates, classes_per_batch=3)
  image_features = np.asarray(jax.jit(lambda m, x: m.encode_image(x))(ref.model, ref.images))
  logits = 100.0 * zero_shot.l2_normalize(image_features) @ ours
  tok = open_clip.get_tokenizer('ViT-B-32')    # the CLIP BPE that ships in the wheel
  with torch.no_grad():
    theirs = open_clip.build_zero_shot_classifier(ref.oc, tok, classnames, templates,
                                                  num_classes_per_batch=3).numpy()
    f = ref.oc.encode_image(torch.from_numpy(ref.images.transpose(0, 3, 1, 2)), normalize=True)
    want = (100.0 * f @ torch.from_numpy(theirs)).numpy()
  err = np.abs(logits - want).max()
  print(f'zero-shot logits parity: {err:.2e}')
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits, want, atol=1e-3, rtol=0)   # x100: 1e-5 on the cosines
  assert (logits.argmax(1) == want.argmax(1)).all()


def test_mismatched_config_is_named(ref):
  f = ref.files['bare']
  wide = _config()
  wide.embed_dim = 64
  with pytest.raises(CheckpointError, match=r'embed_dim \(visual.trunk.head\): file 32 vs '
                     'config 64'):
    open_clip_import.read_open_clip(f, wide)
  deep = _config()
  deep.vision.depth = 3
  with pytest.raises(CheckpointError, match='vision.depth: file 2 vs config 3'):
    open_clip_import.read_open_clip(f, deep)
  with pytest.raises(CheckpointError, match='text.vocab_size: file 49408 vs config 1000'):
    open_clip_import.read_open_clip(f, _config(vocab_size=1000))
  with pytest.raises(CheckpointError, match='text.width: file 32 vs config 64'):
    open_clip_import.read_open_clip(f, _config(width=64, mlp_dim=256))
  # Heads are not in the shapes: the open_clip_config.json kept beside hub releases records them.
  d = ref.tmp / 'recorded'
  d.mkdir()
  (d / f.name).symlink_to(f)
  rec = open_clip_export.open_clip_model_config(_config(heads=2), 'eva02_base_patch16_clip_224')
  (d / 'open_clip_config.json').write_text(json.dumps({'model_cfg': rec}))
  with pytest.raises(CheckpointError, match=r'text_cfg.heads: open_clip_config.json 2 vs config 4'
                     r'.*vision heads \(timm eva02_base_patch16_clip_224\): .* 12 vs config 4'):
    open_clip_import.read_open_clip(d / f.name, ref.cfg)
  with pytest.raises(ValueError, match='EVA02-B-16'):
    open_clip_import.clip_config_for('ViT-B-32')


def test_eva_zero_shot_reads_open_clip_file(ref):
  run = lambda *a: subprocess.Popen(   # noqa: E731
      [sys.executable, '-m', 'eva_jax.cli.zero_shot', f'--checkpoint={ref.files["safetensors"]}',
       *a], env=support.ENV, cwd=support.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  out = ref.tmp / 'metrics.json'
  good = run('--config=clip_demo', f'--config.model.name={NAME}', '--retrieval=',
             f'--output={out}')
  bad = run('--model=eva-clip-tiny', f'--image_size={IMAGE}')
  (_, stderr), (_, bad_err) = good.communicate(timeout=300), bad.communicate(timeout=300)
  assert good.returncode == 0, stderr[-2000:]
  metrics = json.loads(out.read_text())
  assert 'open_clip' in metrics['checkpoint'] and 0.0 <= metrics['zero_shot/top1'] <= 1.0
  assert metrics['zero_shot/top5'] >= metrics['zero_shot/top1']
  errors = [line for line in bad_err.splitlines() if line.startswith('error:')]
  assert bad.returncode == 2 and len(errors) == 1, bad_err[-1500:]
  assert 'vision.swiglu: file True vs config False' in errors[0]
