"""The names a config chooses among, in one place: attention implementations, remat policies, compute dtypes,
the mesh's axes and the default sharding rules. Read by the configs, the accounting, the model and the CLI;
standard library only (``medscale budget`` and ``medscale flops`` import it without JAX)."""

ATTENTION_IMPLEMENTATIONS = ("dense", "xla", "cudnn", "blockwise", "local")
REMAT_POLICIES = ("none", "full", "save_dots")
ENCODER_KINDS = ("unified", "per_modality")  # one encoder stack for every input, or one stack per input modality
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # compute dtypes; parameters stay float32
MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated); a config's ``mesh.rules`` (whose default
# this is) changes the parallelism without a model edit
SHARDING_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("modality", None),
    ("norm", None),
)
