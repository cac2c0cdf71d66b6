"""``geffect demo``, ``profile``, ``report`` and ``build``."""
from __future__ import annotations

from .errors import CLIError
from .inputs import (check_lengths, checked_out_dir, hparams_per_objective, load_model, load_tokenizer,
                     parse_hparams, quiet_transformers, usable_device)


def cmd_demo(args):
    from ..train.run_demo import run_demo

    quiet_transformers()
    run_demo(checked_out_dir(args.out), quick=args.quick, seeds=args.seeds, progress=not args.no_progress)


def cmd_profile(args):
    import torch

    from .. import hf
    from ..backends.registry import check_backend
    from ..data import encode_pairs, load_qa
    from ..eval.report import write_profile
    from ..catalog import OBJECTIVES, resolve
    from ..geffect import GEffectProfiler
    from ..objective_inputs import ReferenceState

    quiet_transformers()
    hparams = hparams_per_objective(args.objective, parse_hparams(args.hparam))
    for name in args.objective:
        resolve(name, hparams[name])
    if args.samples < 1:
        raise CLIError(f"--samples must be a positive integer, got {args.samples}")
    needs_ref = [n for n in args.objective if OBJECTIVES[n].needs_ref]
    needs_model = [n for n in args.objective if OBJECTIVES[n].needs_reference_model]  # its logits (UNDIAL)
    if (needs_ref or needs_model) and not args.reference:
        what = "reference log-probabilities" if needs_ref else "the reference model's distribution"
        raise CLIError(f"objective {(needs_ref or needs_model)[0]!r} needs {what}: pass --reference DIR "
                       f"(the model before unlearning; may be the --model directory itself)")
    out, device = checked_out_dir(args.out), usable_device(args.device)
    check_backend("auto", device)
    model = load_model(args.model, device)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    pairs = load_qa(args.forget)[: args.samples]
    encoded = encode_pairs(tokenizer, pairs)
    check_lengths(encoded, model.config, args.forget, False)
    forget = {k: v.to(device) for k, v in encoded.batch(range(len(pairs))).items()}
    retain = None
    if args.retain:
        r_pairs = load_qa(args.retain)[: args.samples]
        encoded = encode_pairs(tokenizer, r_pairs)
        check_lengths(encoded, model.config, args.retain, False)
        retain = {k: v.to(device) for k, v in encoded.batch(range(len(r_pairs))).items()}
    ref, state = None, None
    if needs_ref or needs_model:
        reference = load_model(args.reference, device).eval()
        with torch.no_grad():
            ref = hf.token_logprobs(reference, forget)
        state = ReferenceState(ref, model=reference if needs_model else None)
    profiler = GEffectProfiler(model, groups=args.groups)
    results = {name: profiler.measure_unlearning(name, forget, retain, ref_logprobs=ref, reference=state,
                                                 **hparams[name])
               for name in args.objective}
    print(write_profile(results, out))


def cmd_report(args):
    from ..eval.report import make_report

    print(f"wrote {make_report(args.run_dir)}")


def cmd_build(args):
    try:
        from ..backends.cpp.build import build_extensions
    except ImportError as err:
        raise CLIError(f"the C++/CUDA extension is unavailable in this install ({err})") from None
    if not build_extensions(verbose=True):  # prints one line per extension
        raise CLIError("no extension could be built here (see the lines above)")
