"""msa_jax: MiniMax Sparse Attention for JAX (spec: shared/spec/msa.md)."""

import jax as _jax

from . import dispatch as _dispatch
from .api import MSAOutput as MSAOutput
from .api import block_sparse_attention as block_sparse_attention
from .api import check_block_indices as check_block_indices
from .api import index_kl_loss as index_kl_loss
from .api import PagedMSAOutput as PagedMSAOutput
from .api import paged_block_sparse_attention as paged_block_sparse_attention
from .api import paged_select_blocks as paged_select_blocks
from .api import paged_sparse_attention as paged_sparse_attention
from .api import select_blocks as select_blocks
from .api import sparse_attention as sparse_attention
from .config import MSAConfig as MSAConfig
from .context_parallel import context_parallel_sparse_attention as context_parallel_sparse_attention
from .context_parallel import unzigzag as unzigzag
from .context_parallel import zigzag as zigzag
from .cuda import CudaImplementation as _CudaImplementation
from .fp8 import dequantize as dequantize_fp8
from .fp8 import quantize as quantize_fp8
from .paged_cache import PagedCache as PagedCache
from .paged_cache import init_paged_cache as init_paged_cache
from .paged_cache import make_page_table as make_page_table
from .paged_cache import paged_append as paged_append
from .pallas import PallasImplementation as _PallasImplementation
from .reference import XlaImplementation as _XlaImplementation

__version__ = "0.1.0"

_dispatch.register(_XlaImplementation())
# Always registered: where it cannot run (no extension, no Hopper GPU) `supports` says why.
_dispatch.register(_CudaImplementation())
# No GPU: the same kernels run in Pallas interpret mode (slow, exact; for tests and CPU users).
_dispatch.register(_PallasImplementation(interpret=_jax.default_backend() not in ("gpu", "cuda")))
