"""Drop-ins for torch.optim: change the import, keep the rest."""

from pyoptim.optim.adam import Adam, AdamW
from pyoptim.optim.sgd import SGD
from pyoptim.optim.lion import Lion
from pyoptim.optim.lamb import LAMB
from pyoptim.optim.adagrad import Adagrad
from pyoptim.optim.rmsprop import RMSprop

__all__ = ["Adam", "AdamW", "SGD", "Lion", "LAMB", "Adagrad", "RMSprop"]
