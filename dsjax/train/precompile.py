"""Compile a program on a background thread, so its first call finds it ready.

The training loop compiles its train step this way while it initialises the state, and
its eval step while the device trains: the first eval otherwise stops training to compile
(about 2 s for `nano` on a 2-core CPU, 4 s for `tiny` on an H200, where the host is idle
while the device trains). `start` lowers and compiles beside the training loop; JAX keeps the
executable, so the loop's later call of the same jitted function with arguments of the
same shapes, dtypes and placement runs it without compiling. A failure here is not
reported: the real call compiles again and reports it.
"""

from __future__ import annotations

import logging
import threading

import jax

log = logging.getLogger(__name__)


def call_specs(args):
    """What a jitted call's cache key sees of `args`, without holding their buffers (which may be donated).

    jax.Array leaves become shape/dtype structs: placed as they are when committed to devices
    (laid out on a mesh, restored from a checkpoint, put on a device), unplaced otherwise, as
    the call keys default-device arguments. Host (numpy) leaves stay as they are: they are the
    call's own inputs.
    """

    def spec(a):
        if not isinstance(a, jax.Array):
            return a
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if a.committed else None)

    return jax.tree.map(spec, args)


def start(jitted, specs, mesh=None) -> threading.Thread:
    """Compile `jitted` for `specs` (from `call_specs`) on a background thread; returns the running thread."""

    def compile_now():
        try:
            if mesh is not None:
                with jax.set_mesh(mesh):
                    jitted.lower(*specs).compile()
            else:
                jitted.lower(*specs).compile()
        except Exception as err:  # noqa: BLE001 - the real call compiles and reports it
            log.debug("background compile failed (%s: %s); the first call compiles instead", type(err).__name__, err)

    # not a daemon: interpreter shutdown must not tear down XLA under a running compile
    thread = threading.Thread(target=compile_now, name="dsjax-precompile")
    thread.start()
    return thread
