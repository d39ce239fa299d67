import sys
from ddpo.toyworld.pretrain import Pretrainer, PretrainConfig
import ddpo.toyworld.render as R
print(R.__file__, len(R.COLORS), len(R.UNUSUAL), flush=True)
cfg = PretrainConfig(unet_steps=1000, unet_schedule_steps=1000, flow_steps=0)
Pretrainer(sys.argv[1], cfg, log=lambda m: print(m, flush=True)).run()
