"""`deepseek-moe-convert to-mp` as a script: python conversion/to_mp.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="to-mp"))
