"""Benchmark section ``reference``: our population training step against a PyTorch eager
reference of the same inner step, run environment after environment as Esper (PyTorch) does.

The step: the baseline CNN host with one conv_light seed in TRAINING at r1c0, a batch of
images, host and seed each updated by its own optimizer (clip the global norm at 1.0, weight
decay 5e-4, SGD with momentum 0.9, lr 0.01). Ours is one jitted ``lax.scan`` over K batches of
``population_step`` for a population of ``reference_envs`` members; the reference is
``reference_envs`` independent PyTorch models, each running the same K batches in turn.
``torch_reference_ratio`` = reference seconds ÷ ours.

This module owns the PyTorch model (:class:`ReferenceCNN`, built lazily so that torch stays an
optional ``bench`` extra), its optimizers (:class:`ReferenceEnv`), the weight copies between
the JAX and the PyTorch layouts, and the section itself. Without torch the section reports
``available: False`` and the suite skips only this row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.slots import format_slot_id
from esper_jax.lattice.training import make_train_step
from experiments.bench.host import LIVE_BLUEPRINT, LIVE_SLOT, with_live_seed
from experiments.bench.timing import Timer, image_batch, stack

TORCH_REQUIREMENT = "torch==2.13.0"
NOT_INSTALLED = f"PyTorch is not installed: pip install -e '.[bench]' (CPU build {TORCH_REQUIREMENT})"


def torch_available() -> bool:
    """Whether ``import torch`` works (torch is imported here, never at module import)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_version() -> str | None:
    if not torch_available():
        return None
    import torch

    return torch.__version__


# ---------------------------------------------------------------------------- the PyTorch model


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Esper's host and seed optimizer (``default_host_optimizer``, ``default_seed_optimizer``)."""

    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_grad_norm: float = 1.0


@functools.cache
def _reference_cnn_class():
    """:class:`torch.nn.Module` subclasses can only be defined once torch is imported."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvLightSeed(nn.Module):
        """conv_light: ``relu(conv3x3(h)) * scale``, the scale starting at zero."""

        def __init__(self, channels: int):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.scale = nn.Parameter(torch.zeros(channels))

        def forward(self, h):
            return F.relu(self.conv(h)) * self.scale[None, :, None, None]

    class ReferenceCNN(nn.Module):
        """The CNN host (NCHW) with one conv_light seed in TRAINING after block ``seed_block``.

        Block: conv (no bias, 'same') → one-group norm (per sample over C, H, W) → ReLU; 2×2
        max-pool after the first ``pool_blocks`` blocks; head: spatial mean → linear.

        ``split_pool_ties``: where a pooling window has tied maxima, share its gradient equally
        among them, as JAX's ``max`` does, instead of sending it all to one element, as
        ``F.max_pool2d`` (the PyTorch original) does. Both are valid subgradients and the host
        never sees the difference (ties are ReLU zeros, whose gradient is zero anyway), but a
        seed in TRAINING reads the gradient at those zeros: with ties split the seed's update
        matches ours to rounding, which is what the equivalence test checks. The benchmark
        times ``F.max_pool2d``.
        """

        def __init__(self, host: CNNHost, seed_block: int, split_pool_ties: bool = False):
            super().__init__()
            if host.kernel_size % 2 == 0:
                raise ValueError("the reference needs an odd kernel size ('same' padding)")
            self.pool_blocks, self.seed_block = host.pool_blocks, seed_block
            self.split_pool_ties = split_pool_ties
            self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
            cin = host.in_channels
            for block in range(host.num_blocks):
                cout = host.width(block)
                self.convs.append(nn.Conv2d(cin, cout, host.kernel_size, padding=host.kernel_size // 2, bias=False))
                self.norms.append(nn.GroupNorm(1, cout, eps=1e-5))
                cin = cout
            self.classifier = nn.Linear(cin, host.num_classes)
            self.seed = ConvLightSeed(host.width(seed_block))

        def host_parameters(self) -> list:
            return [p for name, p in self.named_parameters() if not name.startswith("seed.")]

        def seed_parameters(self) -> list:
            return list(self.seed.parameters())

        def join_seed(self, h):
            """Straight-through, as a seed in TRAINING: the value is exactly ``h``, the seed gets
            the gradient it would get if it were added, the host gets none through it."""
            r = self.seed(h.detach())
            return h + (r - r.detach())

        def pool(self, h):
            if not self.split_pool_ties:
                return F.max_pool2d(h, 2)
            n, c, height, width = h.shape
            # amax shares the gradient among tied maxima (documented torch behaviour)
            return h.reshape(n, c, height // 2, 2, width // 2, 2).amax(dim=(3, 5))

        def forward(self, x, with_seed: bool = True):
            h = x
            for block, (conv, norm) in enumerate(zip(self.convs, self.norms)):
                h = F.relu(norm(conv(h)))
                if with_seed and block == self.seed_block:
                    h = self.join_seed(h)
                if block < self.pool_blocks:
                    h = self.pool(h)
            return self.classifier(h.mean(dim=(2, 3)))

    return ReferenceCNN


def reference_cnn_class():
    """The PyTorch model class (imports torch)."""
    return _reference_cnn_class()


class ReferenceEnv:
    """One environment's inner training as the PyTorch original runs it: a model, a host
    optimizer and a seed optimizer, each clipped separately before its step."""

    def __init__(self, host: CNNHost, seed_block: int, settings: OptimizerSettings = OptimizerSettings(),
                 split_pool_ties: bool = False, model_class=None):
        import torch

        self.settings = settings
        self.model = (model_class or reference_cnn_class())(host, seed_block, split_pool_ties)
        self.host_params, self.seed_params = self.model.host_parameters(), self.model.seed_parameters()
        sgd = dict(lr=settings.learning_rate, momentum=settings.momentum, weight_decay=settings.weight_decay)
        self.host_optimizer = torch.optim.SGD(self.host_params, **sgd)
        self.seed_optimizer = torch.optim.SGD(self.seed_params, **sgd)

    def train_step(self, x, y):
        """One batch (``x`` NCHW float32, ``y`` int64); returns the loss before the update."""
        import torch
        import torch.nn.functional as F

        self.host_optimizer.zero_grad()
        self.seed_optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.host_params, self.settings.max_grad_norm)
        torch.nn.utils.clip_grad_norm_(self.seed_params, self.settings.max_grad_norm)
        self.host_optimizer.step()
        self.seed_optimizer.step()
        return loss.detach()


# ---------------------------------------------------------------------------- JAX <-> PyTorch layouts


def images_to_torch(x):
    """NHWC images (JAX or NumPy) as a contiguous NCHW float32 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def labels_to_torch(y):
    import torch

    return torch.from_numpy(np.array(y, np.int64))


def _hwio_to_oihw(w) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(w, np.float32).transpose(3, 2, 0, 1))


def _oihw_to_hwio(w) -> np.ndarray:
    return np.ascontiguousarray(w.detach().numpy().transpose(2, 3, 1, 0))


def load_jax_weights(model, host_params: dict, seed_params: dict):
    """Copy one member's JAX host parameters (``CNNHost.init`` layout) and conv_light seed
    parameters (``{"w": HWIO, "scale"}``) into ``model``, in place."""
    import torch

    def put(param, value):
        param.copy_(torch.from_numpy(np.array(value, np.float32)))  # a copy: arrays from JAX are read-only

    with torch.no_grad():
        for block, (conv, norm) in enumerate(zip(model.convs, model.norms)):
            p = host_params[f"block{block}"]
            put(conv.weight, _hwio_to_oihw(p["conv"]))
            put(norm.weight, np.asarray(p["scale"]))
            put(norm.bias, np.asarray(p["bias"]))
        put(model.classifier.weight, np.asarray(host_params["classifier"]["w"]).T)  # [C, classes] -> [classes, C]
        put(model.classifier.bias, np.asarray(host_params["classifier"]["b"]))
        put(model.seed.conv.weight, _hwio_to_oihw(seed_params["w"]))
        put(model.seed.scale, np.asarray(seed_params["scale"]))


def host_params_as_jax_layout(model) -> dict:
    """The PyTorch host's parameters as NumPy arrays in the ``CNNHost.init`` layout."""
    params = {}
    for block, (conv, norm) in enumerate(zip(model.convs, model.norms)):
        params[f"block{block}"] = {"conv": _oihw_to_hwio(conv.weight), "scale": norm.weight.detach().numpy().copy(),
                                   "bias": norm.bias.detach().numpy().copy()}
    params["classifier"] = {"w": model.classifier.weight.detach().numpy().T.copy(),
                            "b": model.classifier.bias.detach().numpy().copy()}
    return params


def seed_params_as_jax_layout(model) -> dict:
    return {"w": _oihw_to_hwio(model.seed.conv.weight), "scale": model.seed.scale.detach().numpy().copy()}


# ---------------------------------------------------------------------------- the section


def seed_block_of(model: MorphogeneticModel, slot: int) -> int:
    """The host block whose output (before its pool) slot ``slot`` reads."""
    slot_id = model.lattice.slots.slot_ids[slot]
    for block in range(model.host.num_blocks):
        if format_slot_id(block, 0) == slot_id:
            return block
    raise ValueError(f"the reference places its seed after a block (r<block>c0), not at {slot_id}")


def bench_torch_reference(args) -> dict:
    """Seconds per call of K batches for ``reference_envs`` environments, ours and PyTorch's,
    and their ratio; ``{"available": False, "reason": ...}`` when torch is not installed.
    The timed reference pools with ``F.max_pool2d``, as the PyTorch original does."""
    if not torch_available():
        return {"available": False, "reason": NOT_INSTALLED}
    import torch

    envs, batches, batch = args.reference_envs, args.reference_batches, args.reference_batch
    # The reference's seed is conv_light, so ours must be able to grow it too.
    blueprints = tuple(args.blueprints or ())
    if blueprints and LIVE_BLUEPRINT not in blueprints:
        blueprints += (LIVE_BLUEPRINT,)
    model = MorphogeneticModel.build(CNNHost.baseline(), blueprints=blueprints)
    train = make_train_step(model)
    seed_block = seed_block_of(model, LIVE_SLOT)
    print(f"reference: baseline CNN, one live {LIVE_BLUEPRINT} seed at {model.lattice.slots.slot_ids[LIVE_SLOT]}; "
          f"{envs} envs x {batches} batches of {batch}: our population step (jitted scan) vs PyTorch {torch.__version__} "
          f"eager, env after env ({torch.get_num_threads()} threads)", flush=True)

    init = jax.jit(train.init)
    members = [with_live_seed(model, init(jax.random.key(i)), LIVE_SLOT, LIVE_BLUEPRINT, jax.random.key(100 + i))
               for i in range(envs)]
    population = stack(members)
    xs, ys = image_batch(batch, batches * envs)
    xs = xs.reshape((batches, envs) + xs.shape[1:])  # [K, P, B, H, W, C]
    ys = ys.reshape((batches, envs) + ys.shape[1:])

    @jax.jit
    def ours(state, xs, ys):
        def one_batch(state, batch):
            state, metrics = train.population_step(state, *batch)
            return state, metrics.loss

        return jax.lax.scan(one_batch, state, (xs, ys))

    # The same starting weights and the same data values, converted once, outside the timing.
    references = []
    xs_np, ys_np = np.asarray(xs), np.asarray(ys)
    for p, member in enumerate(members):
        env = ReferenceEnv(model.host, seed_block)
        seed_params = jax.tree.map(np.asarray, model.lattice.unit_params(member.lattice, LIVE_SLOT)[LIVE_BLUEPRINT])
        load_jax_weights(env.model, jax.tree.map(np.asarray, member.host_params), seed_params)
        data = [(images_to_torch(xs_np[k, p]), labels_to_torch(ys_np[k, p])) for k in range(batches)]
        references.append((env, data))

    # Each call trains the PyTorch models on from where the last one left them, while ours starts
    # from the same state every call: the work per call is the same, and it is what is timed.
    def reference():
        losses = [env.train_step(x, y) for env, data in references for x, y in data]
        return losses[-1]

    labels = {"ours": f"ours: population of {envs}, scan over {batches} batches",
              "torch": f"PyTorch eager: {envs} envs one after another"}
    timer = Timer(args.rounds, 1)  # one call is already envs x batches training steps
    timer.add(labels["ours"], lambda: ours(population, xs, ys))  # first call compiles, untimed
    timer.add(labels["torch"], reference)
    times = timer.run()
    seconds = {name: times[label] for name, label in labels.items()}
    return {
        "available": True,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "envs": envs,
        "batches": batches,
        "batch": batch,
        "blueprints": [b.name for b in model.lattice.blueprints],
        "live_seed": {"blueprint": LIVE_BLUEPRINT, "slot": model.lattice.slots.slot_ids[LIVE_SLOT]},
        "execution": model.strategy.execution.value,
        "seconds": seconds,
        "seconds_per_env_batch": {name: s / (envs * batches) for name, s in seconds.items()},
        "compile_seconds": timer.compile_seconds[labels["ours"]],
        "torch_reference_ratio": seconds["torch"] / seconds["ours"],
    }
