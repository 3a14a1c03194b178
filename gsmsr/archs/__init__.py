"""GSM network components. TEMPORARY STUB: the real GSMNet replaces this file's contents."""
import torch
from torch import nn
from torch.nn import functional as F
from basicsr.utils.registry import ARCH_REGISTRY


@ARCH_REGISTRY.register()
class GSMNet(nn.Module):
    def __init__(self, upscale=4, in_chans=3, out_chans=3, prop_depth=4, attn_depth=4, pa_frame=2, embed_dims=192,
                 num_heads=8, spynet_path=None, use_checkpoint_attn=False, use_checkpoint_ffn=False, **kwargs):
        super().__init__()
        self.upscale = upscale
        self.conv = nn.Conv2d(in_chans, out_chans, 3, 1, 1)
        self.spynet = nn.Conv2d(2, 2, 1)  # stands in for the flow network (name contains 'spynet')

    def forward(self, lq):
        b, t, c, h, w = lq.shape
        x = lq.flatten(0, 1)
        y = F.interpolate(x, scale_factor=self.upscale, mode='bilinear', align_corners=False)
        y = y + self.conv(y) + 0 * self.spynet.weight.sum()
        return y.view(b, t, -1, h * self.upscale, w * self.upscale)


def load_checkpoint(net, path, key='params', strict=True):
    sd = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(sd, dict) and key in sd:
        sd = sd[key]
    net.load_state_dict(sd, strict=strict)
    return net
