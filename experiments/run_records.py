r"""Reruns the demo experiments end to end and writes experiments/RECORDS.md.

  python experiments/run_records.py [--root=workdirs/records] [--out=experiments/RECORDS.md]
  python experiments/run_records.py --report_only     # rewrite RECORDS.md from ROOT/results.json

Stages (each one CLI command, run from the repository root, logged to ROOT/logs/<stage>.log):
  split            the demo photo set (8 classes x 48 crops) split per class into train (first 36
                   crops) and test (last 12), as symlinks: every evaluation below is on held-out
                   crops (the demo configs alone evaluate fine-tuning on the training images).
  pretrain         configs/pretrain_demo.py on the train split (150 steps).
  random_init      the same command with lr = 0 for 2 steps: a checkpoint whose encoder is exactly
                   the pretraining run's initialization (init(seed); AdamW updates are lr * (...) =
                   0), and whose val_loss is the loss before any training.
  finetune_*       configs/finetune_demo.py (120 steps) from the pretrained encoder and from random
                   init, evaluated on the test split.
  probe_*          configs/linear_probe_demo.py (k-NN + linear probe on frozen features, trained on
                   the train split, tested on the test split) of the pretrained and random encoders.

Crops of one photo are one class, so the task is easy and measures little beyond "do the
features separate 8 photos"; the numbers are a smoke test of the whole pipeline, one seed each.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = '.run_records'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy', 'torch')
TRAIN_PER_CLASS = 36


def _rel(path: str) -> str:
  rel = os.path.relpath(path, ROOT_DIR)
  return path if rel.startswith('..') else rel


def stages(root: str) -> list[tuple[str, list[str]]]:
  """(name, argv after `python`) of every stage, paths relative to the repository root."""
  r = _rel(root)
  train, test = f'folder:{r}/data/train', f'folder:{r}/data/test'
  pre = ['-m', 'eva_jax.cli.pretrain', '--config=pretrain_demo',
         f'--config.data.source={train}', '--config.progress=False']
  ft = ['-m', 'eva_jax.cli.finetune', '--config=finetune_demo',
        f'--config.data.source={train}', f'--config.eval_source={test}', '--config.progress=False']
  probe = ['-m', 'eva_jax.cli.linear_probe', '--config=linear_probe_demo',
           f'--config.data.source={train}', f'--config.eval_source={test}']
  return [
      ('pretrain', pre + [f'--workdir={r}/pretrain']),
      ('random_init', pre + [f'--workdir={r}/random_init', '--config.total_steps=2',
                             '--config.optim.lr=0', '--config.optim.min_lr=0',
                             '--config.optim.warmup_steps=1', '--config.log_every=1']),
      ('finetune_pretrained', ft + [f'--workdir={r}/finetune_pretrained',
                                    f'--config.init_from={r}/pretrain']),
      ('finetune_random', ft + [f'--workdir={r}/finetune_random']),
      ('probe_pretrained', probe + [f'--config.init_from={r}/pretrain',
                                    f'--workdir={r}/probe_pretrained']),
      ('probe_random', probe + [f'--config.init_from={r}/random_init',
                                f'--workdir={r}/probe_random']),
  ]


def make_split(root: str) -> dict:
  sys.path.insert(0, ROOT_DIR)
  from eva_jax.data.demo import ensure_demo_set
  src = ensure_demo_set()
  counts = {'train': 0, 'test': 0, 'classes': 0}
  for cls in sorted(os.listdir(src)):
    files = sorted(f for f in os.listdir(os.path.join(src, cls)) if f.endswith('.jpg'))
    if not files:
      continue
    counts['classes'] += 1
    for i, f in enumerate(files):
      split = 'train' if i < TRAIN_PER_CLASS else 'test'
      d = os.path.join(root, 'data', split, cls)
      os.makedirs(d, exist_ok=True)
      os.symlink(os.path.join(src, cls, f), os.path.join(d, f))
      counts[split] += 1
  counts['source'] = src
  return counts


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def summarize(name: str, root: str) -> dict:
  if name in ('pretrain', 'random_init'):
    recs = read_jsonl(os.path.join(root, name, 'metrics.jsonl'))
    train = [r for r in recs if 'loss' in r]
    out = {'steps': train[-1]['step'], 'first_loss': train[0]['loss'],
           'final_loss': train[-1]['loss'],
           'val_loss': next(r['val_loss'] for r in reversed(recs) if 'val_loss' in r),
           'max_lr': max(r['lr'] for r in train)}
    speeds = [r['images_per_sec'] for r in train[1:]]   # step 1 includes compilation
    if speeds:
      out['images_per_sec'] = statistics.median(speeds)
    return out
  if name.startswith('finetune'):
    recs = read_jsonl(os.path.join(root, name, 'metrics.jsonl'))
    train = [r for r in recs if 'loss' in r]
    ev = [r for r in recs if 'eval_top1' in r][-1]
    return {'steps': train[-1]['step'], 'final_loss': train[-1]['loss'],
            'eval_top1': ev['eval_top1'], 'eval_top5': ev['eval_top5'],
            'eval_loss': ev['eval_loss'], 'eval_count': ev['eval_count'],
            'images_per_sec': statistics.median(r['images_per_sec'] for r in train[1:])}
  if name.startswith('probe'):
    with open(os.path.join(root, name, 'probe.json')) as f:
      p = json.load(f)
    return {k: p[k] for k in ('knn_top1', 'probe_top1', 'train_images', 'test_images',
                              'num_classes')}
  raise ValueError(name)


def machine() -> dict:
  model = 'unknown'
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  versions = {}
  for p in PACKAGES:
    try:
      versions[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      versions[p] = 'not installed'
  return {'cpu': model, 'cores': os.cpu_count(), 'platform': platform.platform(),
          'python': platform.python_version(), 'load_at_start': load, 'versions': versions}


def run(root: str) -> dict:
  root = os.path.abspath(root)
  if os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, MARKER)):
    raise SystemExit(f'{root} exists and was not made by run_records.py; pass an empty --root.')
  shutil.rmtree(root, ignore_errors=True)   # stale checkpoints would make every stage resume
  os.makedirs(os.path.join(root, 'logs'))
  open(os.path.join(root, MARKER), 'w').close()
  results = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
             'machine': machine(), 'split': make_split(root), 'stages': []}
  env = dict(os.environ, PYTHONPATH=ROOT_DIR)
  t_all = time.perf_counter()
  for name, argv in stages(root):
    log = os.path.join(root, 'logs', f'{name}.log')
    print(f'[{name}] python {" ".join(argv)}', flush=True)
    t0 = time.perf_counter()
    with open(log, 'w') as f:
      proc = subprocess.run([sys.executable, *argv], cwd=ROOT_DIR, env=env, stdout=f,
                            stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
      raise SystemExit(f'[{name}] failed (exit {proc.returncode}); see {log}')
    summary = summarize(name, root)
    if name == 'random_init' and summary['max_lr'] != 0:
      raise SystemExit(f'[random_init] logged lr {summary["max_lr"]}, expected 0.')
    print(f'[{name}] {wall:.0f}s {summary}', flush=True)
    results['stages'].append({'name': name, 'command': 'python ' + ' '.join(argv),
                              'wall_s': wall, **summary})
  results['total_wall_s'] = time.perf_counter() - t_all
  results['root'] = _rel(root)
  with open(os.path.join(root, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  return results


def _pct(x):
  return f'{100 * x:.1f}%'


def report(results: dict) -> str:
  st = {s['name']: s for s in results['stages']}
  m = results['machine']
  sp = results['split']
  lines = [
      '# Records: the demo experiments, end to end',
      '',
      '<!-- Generated by experiments/run_records.py; do not edit by hand. -->',
      '',
      f"Date (UTC): {results['date']}. Machine: {m['cpu']}, {m['cores']} cores visible "
      f"({m['platform']}, Python {m['python']}); CPU only. "
      + (f"Load average at start {m['load_at_start'][0]:.1f} (the machine was shared, so wall "
         'times are upper bounds).' if m.get('load_at_start') else ''),
      '',
      'Packages: ' + ', '.join(f'{k} {v}' for k, v in m['versions'].items()) + '.',
      '',
      f"Data: the demo set ({sp['classes']} scikit-image photos = {sp['classes']} classes, random "
      f"crops of each), split per class into {sp['train']} train / {sp['test']} test crops "
      f'(first {TRAIN_PER_CLASS} / last {48 - TRAIN_PER_CLASS} of each class). Pretraining, '
      'fine-tuning and the probes train on the train split; every accuracy is on the test split. '
      'Test crops are new crops of the same 8 photos, so this is an easy task: treat the numbers as '
      'an end-to-end check of the pipeline (one seed each), not as a benchmark.',
      '',
      '## Results',
      '',
      '| experiment | result | wall |',
      '|---|---|---|',
  ]
  p, r = st['pretrain'], st['random_init']
  lines.append(f"| pretraining, tiny student / random clip-tiny teacher, {p['steps']} steps | "
               f"train loss {p['first_loss']:.3f} (step 1) -> {p['final_loss']:.3f} (step "
               f"{p['steps']}); val_loss {p['val_loss']:.4f} (random init: {r['val_loss']:.4f}); "
               f"{p.get('images_per_sec', 0):.0f} img/s | {p['wall_s']:.0f} s |")
  lines.append(f"| random-init checkpoint (lr 0, {r['steps']} steps) | encoder = init(seed 0); "
               f"val_loss {r['val_loss']:.4f} | {r['wall_s']:.0f} s |")
  for key, label in (('finetune_pretrained', 'fine-tuning from the pretrained encoder'),
                     ('finetune_random', 'fine-tuning from random init')):
    f = st[key]
    lines.append(f"| {label}, {f['steps']} steps | test top-1 **{_pct(f['eval_top1'])}**, top-5 "
                 f"{_pct(f['eval_top5'])}, test loss {f['eval_loss']:.3f} ({f['eval_count']} "
                 f"images); final train loss {f['final_loss']:.3f} | {f['wall_s']:.0f} s |")
  for key, label in (('probe_pretrained', 'frozen pretrained encoder'),
                     ('probe_random', 'frozen random-init encoder')):
    q = st[key]
    lines.append(f"| {label}: k-NN (k=20) / linear probe | k-NN top-1 **{_pct(q['knn_top1'])}**, "
                 f"linear probe top-1 **{_pct(q['probe_top1'])}** ({q['train_images']} train / "
                 f"{q['test_images']} test) | {q['wall_s']:.0f} s |")
  n_test = st['probe_pretrained']['test_images']

  def diff(a, b):   # percentage points and test images
    d = a - b
    return f'{100 * d:+.1f} pts ({round(d * n_test):+d} of {n_test} test images)'

  lines += [
      '',
      'Pretrained minus random init: k-NN '
      f"{diff(st['probe_pretrained']['knn_top1'], st['probe_random']['knn_top1'])}, linear probe "
      f"{diff(st['probe_pretrained']['probe_top1'], st['probe_random']['probe_top1'])}, "
      f"fine-tuning {diff(st['finetune_pretrained']['eval_top1'], st['finetune_random']['eval_top1'])}."
      ' With one seed and 96 test images, differences of a few images are noise; telling 8 photos '
      'apart is easy even from random features, so this setting cannot show the benefit of '
      'pretraining that the paper measures on ImageNet.',
      '',
      f"Total wall time {results['total_wall_s'] / 60:.1f} min.",
      '',
      '## Commands',
      '',
      'From the repository root, after `python experiments/run_records.py` made the split '
      f"(symlinks under `{results['root']}/data/`); each stage's output is in "
      f"`{results['root']}/logs/`:",
      '',
      '```bash',
  ]
  lines += [s['command'] for s in results['stages']]
  lines += [
      '```',
      '',
      'Notes: `random_init` is the pretraining command with a zero learning rate, so its '
      'checkpoint holds exactly the encoder the pretraining run starts from (AdamW updates are '
      'scaled by lr = 0); its val_loss is the loss before training. Fine-tuning from random init '
      'uses the same recipe (layer decay, frozen patch embedding, drop path) as from the '
      'pretrained encoder. Wall times include process start, compilation and evaluation.',
      '',
  ]
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--root', default=os.path.join(ROOT_DIR, 'workdirs', 'records'))
  ap.add_argument('--out', default=os.path.join(ROOT_DIR, 'experiments', 'RECORDS.md'))
  ap.add_argument('--report_only', action='store_true',
                  help='rewrite --out from ROOT/results.json without rerunning')
  args = ap.parse_args()
  if args.report_only:
    with open(os.path.join(args.root, 'results.json')) as f:
      results = json.load(f)
  else:
    results = run(args.root)
  with open(args.out, 'w') as f:
    f.write(report(results))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
