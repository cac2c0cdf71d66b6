import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the suites import their shared setup modules
