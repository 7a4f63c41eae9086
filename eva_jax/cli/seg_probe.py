r"""eva-seg-probe: per-patch linear segmentation probe (mIoU) on the frozen features of an encoder.

  eva-seg-probe --config=seg_probe_demo --config.init_from=workdirs/demo [--workdir=DIR]

config.init_from: an eva_jax workdir or checkpoint, or a timm / official EVA file; '' = a random-init
encoder of config.model (the baseline). Prints a JSON line (miou, pixel_accuracy, per-class IoU,
the majority-class floor); with --workdir also writes WORKDIR/seg_probe.json.
"""
from eva_jax.cli import common


def run():
  common.run_evaluation('seg_probe', __doc__, 'Segmentation-probe', 'seg_probe.json')


if __name__ == '__main__':
  run()
