# Copyright (c) mmnorm contributors. All rights reserved.
"""Replace the soft SN ratios of a checkpoint by hard (argmax) ones; optionally finetune; export
the deploy form in which every hardened layer is its cheapest equivalent.

    python tools/export_hard_ratios.py CONFIG CHECKPOINT DST [--finetune] [--deploy-out DEPLOY]

DST is a checkpoint of the same config with one-hot ratios (it evaluates with tools/test.py as
usual; ``tools/test.py CONFIG DST --deploy`` evaluates the deploy form). It is written atomically;
an existing file, the input checkpoint included, is replaced only with ``--overwrite``.
``--finetune`` trains it further with the ratios frozen (SN study Table 2, right), with the
config's own schedule (override with --cfg-options, e.g. ``train_cfg.max_iters=5000``), from
``hard_ratios.pth`` in ``--work-dir``; DST is written at the end, finetuned.
``--deploy-out`` also saves the state dict of the deploy form with its per-layer plan in
``meta`` (the deploy structure is rebuilt with ``mmnorm.convert.to_deploy`` on a model built
from the config).

Per layer, the deploy form is: μ and σ both BN -> a per-channel affine map folded into the
preceding convolution (``folded``) or a native eval-mode BN where there is none (``affine``);
both IN -> ``nn.InstanceNorm2d``; both LN -> ``nn.GroupNorm(1, C)``; different choices for μ
and σ -> the fused SN layer (``fused``). The tool prints every layer's choice and the share of
layers folded away.

Layers with ``ratio_groups`` > 1 are hardened group by group and their choices printed as runs
over the groups (``IN×2,BN×2``: the first two groups chose IN, the next two BN; ``meta`` keeps
one name per group). Such a layer deploys as above when every group chose the same normalizer
for μ and σ, and otherwise as one ``GroupwiseHardNorm`` (``groupwise``: one reduction, one
elementwise pass); only a layer that is BN in every group folds into its convolution.
"""
import argparse
import os.path as osp
import sys
import tempfile
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import mmnorm  # noqa: E402,F401
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu  # noqa: E402

from mmnorm.convert import hard_choices, harden_ratios, summarize, to_deploy  # noqa: E402
from mmnorm.utils import (OutputError, OutputExistsError, build_runner, check_output,  # noqa: E402
                          finetune_config, last_checkpoint, load_checkpoint_file,
                          save_checkpoint)
from mmnorm.utils.model import build_model, build_model_for_tool, load_config  # noqa: E402


def _listed(choice):
    """A layer's (μ, σ) choice as lists: ``['IN', 'BN']``, or with ratio groups one list of
    names per group for each, ``[['IN', 'BN'], ['BN', 'BN']]``."""
    return [item if isinstance(item, str) else list(item) for item in choice]


def finetune(cfg: Config, hard_checkpoint: str, work_dir: str) -> str:
    """Train from ``hard_checkpoint`` with the ratios frozen; returns the last checkpoint."""
    cfg = finetune_config(cfg, hard_checkpoint, hard_ratios=True)
    cfg.work_dir = work_dir
    cfg.launcher = 'none'
    build_runner(cfg).train()
    return last_checkpoint(work_dir)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('dst', help='hard-ratio checkpoint to write')
    parser.add_argument('--finetune', action='store_true',
                        help="finetune with frozen hard ratios, with the config's schedule")
    parser.add_argument('--work-dir', default=None, help='work dir of the finetuning')
    parser.add_argument('--deploy-out', default=None,
                        help='also save the deploy form (state dict + plan) here')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing DST / --deploy-out (even the input checkpoint)')
    # Single-process (the finetuning too; for a distributed finetune, train the hard checkpoint
    # with tools/dist_train.sh and custom_hooks=[dict(type='HardRatiosHook')]): no --launcher.
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    args = parser.parse_args(argv)
    try:
        for output in filter(None, (args.dst, args.deploy_out)):
            check_output(output, [args.checkpoint, args.config], args.overwrite)
        if args.deploy_out and osp.abspath(args.deploy_out) == osp.abspath(args.dst):
            raise OutputExistsError('DST and --deploy-out name the same file')
    except OutputError as error:
        raise SystemExit(f'error: {error}')
    cfg = load_config(args.config, args.cfg_options)
    model, checkpoint = build_model_for_tool(cfg, args.checkpoint)
    soft = hard_choices(model)
    if not soft:
        raise SystemExit(f'{args.checkpoint} has no SN / SN_tied layer')
    choices = harden_ratios(model)
    if 'state_dict' not in checkpoint:
        checkpoint = {'state_dict': checkpoint}
    checkpoint['state_dict'] = weights_to_cpu(get_state_dict(model))
    checkpoint.pop('optimizer', None)  # the ratios are no longer trained
    meta = checkpoint.setdefault('meta', {})
    meta['hard_ratios'] = dict(source_checkpoint=osp.abspath(args.checkpoint),
                               choices={k: _listed(v) for k, v in choices.items()},
                               finetuned=False, time=time.strftime('%Y-%m-%d %H:%M:%S'))
    # With --finetune, DST is written once, finetuned: the hard checkpoint the finetuning starts
    # from goes to its work dir (an interrupted finetuning leaves DST as it was).
    work_dir = (args.work_dir or tempfile.mkdtemp(prefix='hard_ratio_finetune_')
                if args.finetune else None)
    hard = osp.join(work_dir, 'hard_ratios.pth') if args.finetune else args.dst
    if args.finetune and args.work_dir:  # (a work dir of an earlier finetuning holds one)
        try:
            check_output(hard, [args.checkpoint], args.overwrite)
        except OutputError as error:
            raise SystemExit(f'error: {error}')
    save_checkpoint(checkpoint, hard)
    grouped = sum(1 for mean_choice, _ in choices.values() if not isinstance(mean_choice, str))
    print(f'wrote {hard}: {len(choices)} SN layer(s) with one-hot ratios' +
          (f' ({grouped} with ratio groups, one-hot in every group)' if grouped else ''))

    if args.finetune:
        last = finetune(cfg, hard, work_dir)
        tuned = load_checkpoint_file(last, map_location='cpu')
        tuned.setdefault('meta', {})['hard_ratios'] = dict(meta['hard_ratios'], finetuned=True,
                                                           finetune_checkpoint=last)
        save_checkpoint(tuned, args.dst)
        model = build_model(cfg, args.dst)
        print(f'finetuned with frozen hard ratios ({last}); wrote {args.dst}')

    model.eval()
    plan = to_deploy(model)
    print(summarize(plan, choices))
    if args.deploy_out:
        save_checkpoint({'meta': dict(meta, deploy_plan=plan, config=osp.abspath(args.config)),
              'state_dict': weights_to_cpu(get_state_dict(model))}, args.deploy_out)
        print(f'wrote {args.deploy_out} (deploy form)')
    folded = sum(1 for action in plan.values() if action == 'folded')
    return dict(choices=choices, plan=plan, folded_share=folded / len(plan))


if __name__ == '__main__':
    main()
