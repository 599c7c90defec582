from .asge_cnn import *
