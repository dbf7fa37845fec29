"""`deepseek-moe-convert from-official` as a script: python conversion/from_official.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="from-official"))
