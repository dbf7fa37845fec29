"""`deepseek-moe-convert dequantize` as a script: python conversion/dequantize.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="dequantize"))
