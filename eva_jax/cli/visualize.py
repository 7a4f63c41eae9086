r"""eva-visualize: what a pretrained student predicts: the mask, per-patch cosine to the teacher,
and PCA maps of the student's and the teacher's features, on one image.

  eva-visualize --workdir=workdirs/demo --image=photo.jpg --out=viz.png [--image_size=112x168]

Prints the masked count and the mean masked / visible cosine (the masked one equals the train
step's loss with its sign flipped).
"""
from absl import flags

from eva_jax.cli import common
from eva_jax.evaluation import visualize


def main(argv):
  del argv
  f = flags.FLAGS
  import matplotlib
  matplotlib.use('Agg')
  a = visualize.visualize(f.workdir, f.image, f.out, teacher=f.teacher, mask_seed=f.mask_seed,
                          num_masking_patches=f.num_masking_patches,
                          image_size=f.image_size or None)
  print(f'masked patches: {int(a.mask.sum())}/{a.mask.size}')
  print(f'mean masked cosine: {a.mean_masked_cos:.6f}')
  print(f'mean visible cosine: {a.mean_visible_cos:.6f}')
  print(f'wrote {f.out}')


def run():
  flags.DEFINE_string('workdir', None, 'Pretraining workdir (or checkpoints/<step>).')
  flags.DEFINE_string('image', None, 'An image file (any format PIL reads).')
  flags.DEFINE_string('out', None, 'Output PNG.')
  flags.DEFINE_string('teacher', None, "Teacher checkpoint (of the run's family) or teacher name "
                      "(default: the run's).")
  flags.DEFINE_integer('mask_seed', 0, 'Seed of the drawn block mask.')
  flags.DEFINE_integer('num_masking_patches', 0, "Masked patches; 0 = the run's setting.")
  flags.DEFINE_string('image_size', '', "Crop size: an int or HxW (224x336), multiples of the "
                      "patch; '' = the run's.")
  for name in ('workdir', 'image', 'out'):
    flags.mark_flag_as_required(name)
  common.run(main, __doc__, ['workdir', 'image', 'out', 'teacher', 'mask_seed',
                             'num_masking_patches', 'image_size'])


if __name__ == '__main__':
  run()
