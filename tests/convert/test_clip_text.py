"""Text tower import (eva_jax.convert.clip_text) against random-init transformers and open_clip
references built here: text features < 1e-4 (fp32)."""
import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

import clip_support
from eva_jax.convert import clip_text
from eva_jax.convert.common import CheckpointError
from eva_jax.models import clip

torch = pytest.importorskip('torch')

WIDTH, DEPTH, HEADS, EMBED, VOCAB, CTX = 32, 2, 4, 32, 49408, 77


def _tokens(b=4, seed=0):
  """CLIP-like rows: SOT, words, EOT (the largest id) at varying positions, zero padding."""
  rng = np.random.default_rng(seed)
  t = np.zeros((b, CTX), np.int64)
  for i, n in enumerate(rng.integers(3, CTX - 1, size=b)):
    t[i, 0] = 49406
    t[i, 1:n] = rng.integers(1, 49405, size=n - 1)
    t[i, n] = 49407
  return t


def _features(weights, tokens):
  tower = nnx.eval_shape(lambda: clip.TextTransformer(weights.config, weights.embed_dim,
                                                      rngs=nnx.Rngs(0)))
  clip_text._set_params(tower, weights.params, weights.source)
  return np.asarray(jax.jit(lambda m, t: m(t))(tower, tokens.astype(np.int32)))


def _open_clip_model(quick_gelu: bool, custom_text: bool):
  import open_clip
  torch.manual_seed(0)
  cfg = dict(embed_dim=EMBED, quick_gelu=quick_gelu, custom_text=custom_text,
             vision_cfg=dict(image_size=28, layers=1, width=32, patch_size=14, head_width=16),
             text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=WIDTH, heads=HEADS,
                           layers=DEPTH))
  kwargs = {k: v for k, v in cfg.items() if k != 'custom_text'}
  model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**kwargs)
  with torch.no_grad():   # non-trivial LayerNorms and biases so every tensor is tested
    for n, p in model.named_parameters():
      if n.endswith('bias') or 'ln' in n:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval(), cfg


@pytest.mark.parametrize('layout', ['transformers_text', 'transformers_clipmodel'])
def test_transformers_directory(tmp_path, layout):
  import transformers
  torch.manual_seed(0)
  tcfg = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
      num_attention_heads=HEADS, max_position_embeddings=CTX, hidden_act='gelu',
      projection_dim=EMBED, eos_token_id=2)
  if layout == 'transformers_text':
    ref = transformers.CLIPTextModelWithProjection(tcfg).eval()
  else:
    vcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14)
    ref = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=EMBED)).eval()
  with torch.no_grad():
    for n, p in ref.named_parameters():
      if n.endswith('bias') or 'norm' in n:
        p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(tmp_path)
  tokens = _tokens()
  with torch.no_grad():
    t = torch.from_numpy(tokens)
    want = (ref(input_ids=t).text_embeds if layout == 'transformers_text'
            else ref.get_text_features(input_ids=t))
    want = getattr(want, 'pooler_output', want).numpy()
  w = clip_text.read_text_tower(str(tmp_path))
  assert (w.config.act, w.config.heads, w.embed_dim) == ('gelu', HEADS, EMBED)
  np.testing.assert_allclose(_features(w, tokens), want, atol=1e-4, rtol=0)


def test_open_clip_and_openai_layouts(tmp_path, caplog):
  tokens = _tokens(seed=1)
  # open_clip custom text (EVA-CLIP models): text.* keys, facts from open_clip_config.json.
  model, cfg = _open_clip_model(quick_gelu=False, custom_text=True)
  with torch.no_grad():
    want = model.encode_text(torch.from_numpy(tokens)).numpy()
  f = tmp_path / 'oc' / 'open_clip_pytorch_model.bin'
  f.parent.mkdir()
  torch.save(model.state_dict(), f)
  (f.parent / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg}))
  w = clip_text.read_text_tower(str(f))
  assert w.config.act == 'gelu' and 'logit_scale' in w.extra
  np.testing.assert_allclose(_features(w, tokens), want, atol=1e-4, rtol=0)

  # OpenAI layout (top-level token_embedding, transformer.resblocks): a bare state dict records
  # neither activation nor heads -> refused, then given explicitly.
  model, _ = _open_clip_model(quick_gelu=True, custom_text=False)
  with torch.no_grad():
    want = model.encode_text(torch.from_numpy(tokens)).numpy()
  sd = model.state_dict()
  with pytest.raises(CheckpointError, match='act and heads'):
    clip_text.read_text_tower(sd)
  with pytest.raises(CheckpointError, match='contradicts'):
    g = tmp_path / 'oc' / 'openai.pt'
    torch.save(sd, g)   # next to the gelu open_clip_config.json: quick_gelu contradicts it
    clip_text.read_text_tower(str(g), act='quick_gelu', heads=HEADS)
  w = clip_text.read_text_tower(sd, act='quick_gelu', heads=HEADS)
  assert w.config.act == 'quick_gelu' and w.config.ln_eps == 1e-5
  np.testing.assert_allclose(_features(w, tokens), want, atol=1e-4, rtol=0)


def test_load_into_model_and_width_mismatch(tmp_path):
  model = clip_support.random_clip(clip.clip_config('eva-clip-tiny', image_size=28))
  oc, cfg = _open_clip_model(quick_gelu=False, custom_text=True)
  tokens = _tokens(seed=2)
  with torch.no_grad():
    want = oc.encode_text(torch.from_numpy(tokens)).numpy()
  clip_text.load_text_tower(model, oc.state_dict(), act='gelu', heads=HEADS)
  got = np.asarray(jax.jit(lambda m, t: m.encode_text(t))(model, tokens.astype(np.int32)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert abs(float(model.logit_scale[...]) - oc.logit_scale.item()) < 1e-6

  import open_clip
  wide = open_clip.CustomTextCLIP(**{**{k: v for k, v in cfg.items() if k != 'custom_text'},
                                     'text_cfg': {**cfg['text_cfg'], 'width': 64}})
  with pytest.raises(CheckpointError, match=r'text\.width: file 64 vs config 32'):
    clip_text.load_text_tower(model, wide.state_dict(), act='gelu', heads=HEADS)


@pytest.mark.filterwarnings('ignore:`torch.jit:FutureWarning')   # the format OpenAI released
@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
def test_openai_torchscript_archive_and_pickled_state_dict(tmp_path):
  """OpenAI's released ViT-*.pt are TorchScript archives (open_clip's load_openai_model:
  torch.jit.load): one built here from an OpenAI-layout open_clip.CLIP (QuickGELU, heads =
  width // 64 as OpenAI's loader rebuilds them) reads with act and heads from the archive; the
  same weights pickled as a plain state dict record neither, so they are given."""
  import open_clip
  torch.manual_seed(0)
  width, heads = 128, 2   # heads = width // 64: what an OpenAI archive implies
  oc = open_clip.CLIP(embed_dim=EMBED, quick_gelu=True,
                      vision_cfg=dict(image_size=28, layers=1, width=64, patch_size=14,
                                      head_width=64),
                      text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=width,
                                    heads=heads, layers=DEPTH)).eval()
  with torch.no_grad():
    for n, p in oc.named_parameters():
      if n.endswith('bias') or 'ln' in n:
        p.add_(0.1 * torch.randn_like(p))
    oc.logit_scale.fill_(3.0)
  archive = tmp_path / 'ViT-tiny.pt'
  torch.jit.save(torch.jit.script(oc), str(archive))
  tokens = _tokens(seed=3)
  with torch.no_grad():
    want = torch.jit.load(str(archive), map_location='cpu').encode_text(
        torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(oc.encode_text(torch.from_numpy(tokens)).numpy(), want,
                               atol=1e-6, rtol=0)
  cfg = clip.clip_config('eva-clip-tiny', image_size=28)
  cfg.text = clip.text_config('text-tiny', width=width, heads=heads, mlp_dim=4 * width,
                              act='quick_gelu')
  model = clip_support.random_clip(cfg)
  w = clip_text.load_text_tower(model, str(archive))
  assert (w.config.act, w.config.heads) == ('quick_gelu', heads)
  got = np.asarray(jax.jit(lambda m, t: m.encode_text(t))(model, tokens.astype(np.int32)))
  print(f'OpenAI TorchScript text parity: {np.abs(got - want).max():.2e}')
  assert want.std() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert abs(float(model.logit_scale[...]) - 3.0) < 1e-6
  with pytest.raises(CheckpointError, match="act='gelu' contradicts the TorchScript archive"):
    clip_text.read_text_tower(str(archive), act='gelu')

  # A traced archive (torch.jit.trace of encode_text) keeps the module classes too.
  traced = tmp_path / 'ViT-tiny-traced.pt'
  torch.jit.save(torch.jit.trace_module(oc, {'encode_text': (torch.from_numpy(tokens),)}),
                 str(traced))
  w3 = clip_text.read_text_tower(str(traced))
  assert (w3.config.act, w3.config.heads) == ('quick_gelu', heads)
  for k, v in w.params.items():
    np.testing.assert_array_equal(w3.params[k], v, err_msg=k)

  pickled = tmp_path / 'ViT-tiny-state-dict.pt'
  torch.save(oc.state_dict(), pickled)
  with pytest.raises(CheckpointError, match='act and heads'):
    clip_text.read_text_tower(str(pickled))
  w2 = clip_text.read_text_tower(str(pickled), act='quick_gelu', heads=heads)
  assert sorted(w2.params) == sorted(w.params)
  for k, v in w.params.items():
    np.testing.assert_array_equal(w2.params[k], v, err_msg=k)
