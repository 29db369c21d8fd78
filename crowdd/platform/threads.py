"""The environment that caps a child's CPU threads (TensorFlow's pools, OpenMP, BLAS)."""

from __future__ import annotations


def thread_env(threads: int) -> dict[str, str]:
    """Environment for the job child that caps TensorFlow's (and BLAS's) CPU threads."""
    n = str(max(1, int(threads)))
    return {
        "TF_NUM_INTRAOP_THREADS": n,
        "TF_NUM_INTEROP_THREADS": n,
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }


__all__ = ["thread_env"]
