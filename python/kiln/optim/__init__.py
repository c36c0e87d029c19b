"""The optimizers of the notes (section 9) as drop-in torch.optim.Optimizer subclasses.

SGD, Adam, AdamW and RMSprop take torch's arguments and keep torch's state_dict layout
(a torch optimizer's state_dict loads into them and the other way round); NGD is the
notes' normalized gradient descent. Each step is one fused multi-tensor update per
parameter group, device and dtype (kiln.ops.optim), dispatched by kiln.backend.
"""

from .adam import Adam, AdamW
from .ngd import NGD
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "NGD"]
