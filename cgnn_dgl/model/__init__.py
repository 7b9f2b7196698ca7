"""CGNN model: layers on :mod:`cgnn_dgl.graph_ops`, presets via :class:`cgnn_dgl.config.ModelConfig`,
multitask heads and reference-weight loading.

>>> model = CGNN(ModelConfig.preset("benchmark", targets=("formation_energy",)))
>>> y = model(z, GraphIndex.from_graph(batched_graph))          # (n_crystals, 1), standardised
>>> model = CGNN.from_reference("cgnn_oqmd_fe_benchmark.pth")     # official weights, eV/atom
"""
from cgnn_dgl.config import ModelConfig
from cgnn_dgl.model.activations import SSP, get_activation
from cgnn_dgl.model.cgnn import (
    CGNN,
    CLASS_NAMES,
    detect_reference_preset,
    load_reference_state_dict,
    read_reference_state_dict,
    reference_key_mismatch,
)
from cgnn_dgl.model.species import SPECIES_Z, UnsupportedSpeciesError, species_index

__all__ = [
    "CGNN",
    "CLASS_NAMES",
    "SPECIES_Z",
    "SSP",
    "ModelConfig",
    "UnsupportedSpeciesError",
    "detect_reference_preset",
    "get_activation",
    "load_reference_state_dict",
    "read_reference_state_dict",
    "reference_key_mismatch",
    "species_index",
]
