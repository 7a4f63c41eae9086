"""Export of the video classifier to the official EVA-01 video layout, checked against a small
PyTorch video EVA written here from timm's EvaBlock with a Conv3d patch embedding."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from eva_jax.convert import common, video_export
from eva_jax.models import config as model_config, video

torch = pytest.importorskip('torch')
tev = pytest.importorskip('timm.models.eva')


class TorchVideoEva(torch.nn.Module):
  """The official EVA-01 video classifier's forward: Conv3d patch embed (stride = kernel), cls,
  + pos_embed, blocks (joint attention over all tokens), mean of patch tokens, fc_norm, head."""

  def __init__(self, width, depth, heads, mlp_ratio, eps, patch, tubelet, tokens, classes):
    super().__init__()
    self.patch_embed = torch.nn.Module()
    self.patch_embed.proj = torch.nn.Conv3d(3, width, (tubelet, patch, patch),
                                            stride=(tubelet, patch, patch))
    self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + tokens, width))
    norm = functools.partial(torch.nn.LayerNorm, eps=eps)
    self.blocks = torch.nn.ModuleList([
        tev.EvaBlock(width, heads, qkv_bias=True, qkv_fused=True, mlp_ratio=mlp_ratio,
                     norm_layer=norm) for _ in range(depth)])
    self.fc_norm = norm(width)
    self.head = torch.nn.Linear(width, classes)

  def forward(self, x):                      # x [B, 3, T, H, W]
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.fc_norm(x[:, 1:].mean(1)))


@pytest.mark.parametrize('frames,tubelet', [(4, 1), (4, 2)])
def test_official_video_layout_parity(frames, tubelet):
  cfg = model_config.encoder_config('tiny')
  cfg.image_size = 28
  model = video.VideoClassifier(cfg, 7, num_frames=frames, tubelet=tubelet,
                                rngs=nnx.Rngs(params=0))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  pure = jax.tree.map(lambda v: np.asarray(v) + 0.05 * rng.normal(size=v.shape).astype(np.float32),
                      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  enc_cfg = model.encoder.cfg
  sd = video_export.to_official_video_state_dict(common.flatten(pure), enc_cfg)
  assert sd['patch_embed.proj.weight'].shape == (64, 3, tubelet, 14, 14)
  assert sd['pos_embed'].shape == (1, 1 + frames // tubelet * 4, 64)
  ref = TorchVideoEva(64, 2, 4, cfg.mlp_dim / 64, cfg.ln_eps, 14, tubelet, frames // tubelet * 4, 7)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  clip = rng.normal(size=(2, frames, 28, 28, 3)).astype(np.float32)
  got = np.asarray(model(clip))
  with torch.no_grad():
    want = ref(torch.from_numpy(clip).permute(0, 4, 1, 2, 3)).numpy()
  assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_export_refuses_image_params():
  cfg = model_config.encoder_config('tiny')
  with pytest.raises(ValueError, match=r'\[t, p, p, C, D\]'):
    video_export.to_official_video_state_dict(
        {'encoder/patch_kernel': np.zeros((14, 14, 3, 64), np.float32)}, cfg)
