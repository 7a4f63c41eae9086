r"""eva-seg-probe: per-patch linear segmentation probe (mIoU) on the frozen features of an encoder.

  eva-seg-probe --config=seg_probe_demo --config.init_from=workdirs/demo [--workdir=DIR]

config.init_from: an eva_jax workdir or checkpoint, or a timm / official EVA file; '' = a random-init
encoder of config.model (the baseline). Prints a JSON line (miou, pixel_accuracy, per-class IoU,
the majority-class floor); with --workdir also writes WORKDIR/seg_probe.json.
"""
import json

from absl import flags
from etils import epath

from eva_jax.cli import common


def main(argv):
  del argv
  from eva_jax.evaluation import seg_probe   # jax and the models: only once flags are parsed
  out = seg_probe.evaluate(flags.FLAGS.config)
  if flags.FLAGS.workdir:
    workdir = epath.Path(flags.FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'seg_probe.json').write_text(json.dumps(out, indent=2))
  print(json.dumps(out), flush=True)


def run():
  common.define_config('Segmentation-probe config.')
  common.define_workdir('Optional: writes seg_probe.json here.', required=False)
  common.run(main, __doc__, ['config', 'workdir'])


if __name__ == '__main__':
  run()
