"""`deepseek-moe-convert from-mp` as a script: python conversion/from_mp.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="from-mp"))
