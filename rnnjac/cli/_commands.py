"""``rnnjac analyze``, ``verify``, ``plot`` and ``info``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ._messages import _printable, exponent_summary, lyapunov_check_line
from ._output import (
    _command_line,
    _expand,
    _identity,
    _open_spectra,
    _output_folder,
    _print_table,
    _write,
    write_plots,
)


# ----------------------------------------------------------------------------- helpers
def _input_spec(args):
    from .._pipeline import InputSpec, check_input_spec

    return check_input_spec(
        InputSpec(
            path=args.inputs,
            key=args.inputs_key,
            time_major=args.time_major,
            batch=args.batch,
            steps=args.steps,
            input_std=args.input_std,
            autonomous=args.autonomous,
            h0=args.h0,
            seed=args.seed,
        )
    )


def _load_kwargs(args) -> dict:
    return {"arch": args.arch, "nonlinearity": args.nonlinearity, "prefix": args.prefix, "unsafe": args.unsafe}


def _model_spec(args):
    """``--model``/``--model-kwargs``/``--submodule`` as a ``ModelSpec`` (None without ``--model``), checked and
    the class imported before any work."""
    if args.model is None:
        if args.model_kwargs is not None or args.submodule is not None:
            raise ValueError("--model-kwargs and --submodule describe the model class given with --model; add --model")
        return None
    if not args.inputs:
        raise ValueError(
            "--model runs your whole model on its own inputs, whose size rnnjac cannot know: give them with --inputs"
        )
    kwargs = {}
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--model-kwargs must be a JSON object; {args.model_kwargs!r} is not JSON ({err.msg} at character "
                f"{err.pos})"
            ) from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object {{...}}; got {args.model_kwargs!r}")
    from .._user_model import ModelSpec, import_model_class

    _import_from_the_current_folder()
    import_model_class(args.model)
    return ModelSpec(args.model, kwargs, args.submodule)


def _import_from_the_current_folder() -> None:
    """Put the current folder first on the import path, as ``python -m`` does (a console script's path lacks it),
    for this process and for the worker processes a sweep starts (``PYTHONPATH``): ``--model mynet:Net`` finds
    ``./mynet.py``."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, paths)])


def _warn_ignored(path, args) -> None:
    """Without ``--model``: one line naming the checkpoint's weights that the analysis leaves out."""
    from .._user_model import ignored_weights_message

    message = ignored_weights_message(path, {"prefix": args.prefix, "unsafe": args.unsafe})
    if message:
        print(f"rnnjac: warning: {_printable(message)}", file=sys.stderr)


# ----------------------------------------------------------------------------- commands
def _spectra_options(args):
    """The one :class:`~rnnjac._options.SpectraOptions` of ``rnnjac analyze``, validated before any work."""
    from .._options import SpectraOptions

    return SpectraOptions(
        k=args.k,
        singular_values=_singular_values(args),
        warmup=args.warmup,
        tangent_warmup=args.tangent_warmup,
        reortho_every=args.reortho_every,
        eigenvalues=args.eigenvalues,
        end_to_end=args.end_to_end,
        lyapunov=not args.no_lyapunov,
        local_lyapunov=args.local,
        keep_states=args.keep_states,
        state=args.state,
        method=args.method,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        ci=args.ci,
    )


def _singular_values(args):
    """``--singular-values K`` / ``--no-singular-values`` as ``SpectraOptions.singular_values`` (True: all)."""
    top = args.singular_values
    if top is None:
        return not args.no_singular_values
    if args.no_singular_values:
        raise ValueError(
            "--singular-values K keeps the top K singular values and --no-singular-values skips them: give one"
        )
    if isinstance(top, str) or top < 1:
        raise ValueError(f"--singular-values must be an integer K >= 1 (the top K per step); got {top!r}")
    return top


def _max_lag(args, sweep: bool):
    """``--sensitivity --max-lag L`` as ``L`` (None without them), checked before any work."""
    if args.sensitivity != (args.max_lag is not None):
        given, missing = ("--sensitivity", "--max-lag L") if args.sensitivity else ("--max-lag", "--sensitivity")
        raise ValueError(f"{given} needs {missing}: give both, e.g. --sensitivity --max-lag 20")
    if args.max_lag is None:
        return None
    if sweep:
        raise ValueError(
            f"--sensitivity analyses one checkpoint; got a sweep over {sweep}: run 'rnnjac analyze CKPT "
            "--sensitivity --max-lag L' on each checkpoint, one at a time"
        )
    return args.max_lag  # checked against the inputs' T by analyze_checkpoint, before any work


def cmd_analyze(args, argv) -> int:
    from .. import _io
    from .._pipeline import analyze_checkpoint, check_device

    inputs = _input_spec(args)
    check_device(args.device)
    options = _spectra_options(args)
    model = _model_spec(args)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"workers must be an integer >= 1; got {args.workers}")
    paths = _expand(args.checkpoints)
    out = Path(args.out)
    sweep = len(paths) > 1 or args.scheduler or args.workers
    max_lag = _max_lag(args, len(paths) if sweep else 0)
    if sweep and args.check_lyapunov:
        raise ValueError(
            f"--check-lyapunov checks one checkpoint; got a sweep over {len(paths)}: run 'rnnjac analyze CKPT "
            "--check-lyapunov' on the checkpoints to check, one at a time"
        )
    # a sweep resumes or extends an existing output of its own configuration (analyze_checkpoints decides);
    # it must still be a file rnnjac wrote, of the right kind
    exists = os.path.lexists(out)
    _io.check_output(out, overwrite=args.overwrite or bool(sweep and exists), kind="dataset")
    if model is None:
        _warn_ignored(paths[0], args)
    if sweep:
        from .._sweeps import analyze_checkpoints

        before = _identity(out)
        ds = analyze_checkpoints(
            paths,
            inputs=inputs,
            options=options,
            out=out,
            overwrite=args.overwrite,
            load_kwargs=_load_kwargs(args),
            scheduler=args.scheduler,
            workers=args.workers,
            command=_command_line(argv),
            progress=not args.quiet,
            model=model,
        )
        n = ds.sizes.get("checkpoint", 0)
        if before is not None and _identity(out) == before:
            print(f"{out} already holds all {n} checkpoints with these options: nothing to compute, nothing written")
        else:
            print(f"wrote {out} ({n} checkpoints)")
        return 0
    extra = {} if model is None else {"model": model}
    if args.check_lyapunov:
        extra["check_lyapunov"] = True
    if max_lag is not None:
        extra["max_lag"] = max_lag
    ds = analyze_checkpoint(
        paths[0],
        inputs,
        options,
        load_kwargs=_load_kwargs(args),
        progress=not args.quiet,
        command=_command_line(argv),
        **extra,
    )
    _write(_io.save, ds, out, overwrite=args.overwrite, written=args.written)
    if not args.quiet or "lyapunov_exponents" not in ds:  # -q: the result line only
        print(f"wrote {out}: {', '.join(ds.data_vars)}")
    if "lyapunov_exponents" in ds:
        print(exponent_summary(ds))
    if "lyapunov_check_passed" in ds.attrs:
        print(lyapunov_check_line(ds.attrs))
        return 0 if ds.attrs["lyapunov_check_passed"] else 1
    return 0


def _verify_report(ds, quiet: bool) -> None:
    a = ds.attrs
    result = "PASS" if a["passed"] else "FAIL"
    abs_err, rel_err = float(ds.fd_max_abs_error.max()), float(ds.fd_max_rel_error.max())
    if quiet:
        print(f"{result}: max abs err {abs_err:.2e}, max rel err {rel_err:.2e}, rtol/atol {a['rtol']:g}/{a['atol']:g}")
    else:
        row = [a["architecture"], a["method"], a["mode"], a["dtype"], f"{abs_err:.2e}", f"{rel_err:.2e}"]
        row += [f"{a['rtol']:g}/{a['atol']:g}", result]
        headers = ["architecture", "method", "mode", "dtype", "max abs err", "max rel err", "rtol/atol", "result"]
        _print_table([row], headers)
    if not a["passed"]:
        print(
            f"worst entry: sample {a['worst_batch']}, step t={a['worst_time']}, {a['worst_block']} "
            f"(error {a['worst_tolerance_ratio']:.3g}x the tolerance)"
        )


def _verify_target(args, spec, device, model):
    """``(model, inputs, h0, extra keywords, attrs)`` of ``rnnjac verify``: the checkpoint's recurrent module, or
    with ``--model`` the user's whole model (verified on its recurrent submodule)."""
    from .._checkpoints import checkpoint_info, load_checkpoint
    from .._dynamics import as_dynamics
    from .._pipeline import DTYPES, make_h0, make_inputs

    if model is not None:
        from .._user_model import load_model

        if spec.h0 != "zeros":
            raise ValueError("--h0 random applies to a recurrent module fed directly; with --model leave --h0 out")
        whole = load_model(args.checkpoint, model.model, model.model_kwargs, unsafe=args.unsafe)
        dtype = DTYPES[args.dtype] if args.dtype else next(whole.parameters()).dtype
        x = make_inputs(spec, 0, dtype)
        attrs = {"model": model.model, "model_kwargs": json.dumps(model.model_kwargs, sort_keys=True)}
        return whole.to(device=device, dtype=dtype), x, None, {"submodule": model.submodule}, attrs
    module = load_checkpoint(args.checkpoint, **_load_kwargs(args))
    dtype = DTYPES[args.dtype] if args.dtype else next(module.parameters()).dtype
    module = module.to(device=device, dtype=dtype)
    x = make_inputs(spec, checkpoint_info(module)["input_size"], dtype)
    h0 = make_h0(spec, as_dynamics(module).state_size, x.shape[0], dtype)
    return module, x, None if h0 is None else h0.to(device), {}, {}


def cmd_verify(args, argv) -> int:
    import torch

    from .. import _io
    from .._checkpoints import sha256
    from .._pipeline import check_device, stage
    from .._verify import verify

    spec = _input_spec(args)
    device = check_device(args.device)
    model = _model_spec(args)
    if args.check_lyapunov and not args.inputs:
        from .._lyapunov_check import check_options

        check_options(10, 1e-7, 0, 0, 0.95, spec.steps)
    if args.out:
        _io.check_output(args.out, overwrite=args.overwrite, kind="dataset")
    if model is None:
        _warn_ignored(args.checkpoint, args)
    digest = sha256(args.checkpoint) if args.out else ""
    with stage(f"loading {args.checkpoint}"):
        module, x, h0, extra, attrs = _verify_target(args, spec, device, model)
    with stage(f"checking J_t against float64 finite differences on {tuple(x.shape)} inputs"):
        ds = verify(
            module,
            x.to(device),
            h0,
            state=args.state,
            method=args.method,
            eps=args.eps,
            rtol=args.rtol,
            atol=args.atol,
            directions=args.directions,
            generator=torch.Generator().manual_seed(args.seed),
            **extra,
        )
    _verify_report(ds, args.quiet)
    passed = bool(ds.attrs["passed"])
    if args.check_lyapunov:
        from .._options import SpectraOptions
        from .._pipeline import lyapunov_check_attrs

        options = SpectraOptions(seed=args.seed, device=args.device)
        ds.attrs.update(lyapunov_check_attrs(module, x.to(device), h0, options, submodule=extra.get("submodule")))
        print(lyapunov_check_line(ds.attrs))
        passed = passed and bool(ds.attrs["lyapunov_check_passed"])
    if args.out:
        ds.attrs.update(
            checkpoint=str(args.checkpoint),
            checkpoint_sha256=digest,
            inputs=spec.describe(),
            command=_command_line(argv),
            **attrs,
        )
        _write(_io.save, ds, args.out, overwrite=args.overwrite, written=args.written)
    return 0 if passed else 1


def cmd_plot(args, argv) -> int:
    ds = _open_spectra(args.spectra)
    stem = Path(args.spectra).stem + "_"
    with _output_folder(Path(args.out)):
        write_plots(ds, args.out, args.format, args.overwrite, stem=stem, written=args.written)
    for p in args.written:
        print(p)
    return 0


def cmd_info(args, argv) -> int:
    path = Path(args.path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() in (".nc", ".zarr"):
        from .._datasets import SUMMARY_ATTRS

        ds = _open_spectra(path)
        print(f"spectra file {_printable(path)}")
        print("dims: " + ", ".join(f"{_printable(k)}={v}" for k, v in ds.sizes.items()))
        for name, var in ds.data_vars.items():
            desc = f"{var.attrs.get('long_name', '')} [{var.attrs.get('units', '')}]"
            print(f"  {_printable(name)}{var.dims}: {_printable(desc)}")
        for k in SUMMARY_ATTRS:
            if k in ds.attrs:
                value = ds.attrs[k]
                print(f"{k}: {_printable(f'{value:.4g}' if isinstance(value, float) else value)}")
        if "lyapunov_check_passed" in ds.attrs:
            print(lyapunov_check_line(ds.attrs))
        return 0
    from .._checkpoints import inspect_checkpoint

    info = inspect_checkpoint(path, prefix=args.prefix, unsafe=args.unsafe)
    print(f"checkpoint {_printable(path)}")
    for k in ("arch", "input_size", "hidden_size", "num_layers", "proj_size", "bias", "prefix"):
        print(f"{k}: {_printable(repr(info[k]) if k == 'prefix' else info[k])}")
    if info["arch"] == "rnn":
        print(f"nonlinearity: {_printable(info['nonlinearity'])} ({_printable(info['nonlinearity_source'])})")
    if info["training_step"] is not None:
        print(f"training_step: {info['training_step']}")
    for k, v in sorted(info["metadata"].items()):
        print(f"metadata.{_printable(k)}: {_printable(v)}")
    return 0
