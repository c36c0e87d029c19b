"""The activations fused into kiln's kernels, shared by every kernel form.

Each activation has an integer code (the kernels' compile-time switch; csrc/ uses the
same numbers) and says which tensor its backward reads to get act'(z):

* ``"output"``: the derivative is a function of y = act(z) (relu: y > 0, tanh: 1 - y^2,
  sigmoid: y (1 - y)), so backward reuses the op's own output and nothing extra is stored;
* ``"preact"``: gelu, gelu_tanh and silu need z itself, so forward also writes z;
* ``None``: identity, whose derivative is 1.
"""

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu")
CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
IDENTITY, RELU, GELU, GELU_TANH, TANH, SIGMOID, SILU = range(len(ACTIVATIONS))

SAVED = {
    "identity": None,
    "relu": "output",
    "tanh": "output",
    "sigmoid": "output",
    "gelu": "preact",
    "gelu_tanh": "preact",
    "silu": "preact",
}

# gelu_tanh: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), as torch's approximate="tanh".
SQRT_2_OVER_PI = 0.7978845608028654
GELU_TANH_CUBIC = 0.044715
INV_SQRT_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
