"""`deepseek-moe-convert verify` as a script: python conversion/verify.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="verify"))
