# Makes the flat top-level modules (ddpm.py, unet.py, ...) importable from tests/ without installing anything.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
