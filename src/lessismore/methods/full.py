"""Full attention: every layer reads the whole KV cache. The reference every method is tested against."""
from lessismore.methods.base import LayerRole, Method, register


@register
class Full(Method):
    name = "full"
    settings = {}
    dense = True

    def layer_roles(self, cfg, num_layers):
        return [LayerRole.FULL] * num_layers

    def select(self, cfg, q, k, valid):
        raise RuntimeError("full attention makes no selection")
