import sys
from pathlib import Path

# bench/ is not a package: let its files import common.py.
sys.path.insert(0, str(Path(__file__).parent))
