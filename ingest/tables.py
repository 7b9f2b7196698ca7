"""Explicit SQLAlchemy Core definitions of the OQMD tables the ingest reads (oqmd-schema.md §1, §5).

Why explicit tables instead of reflection: reflected MySQL DOUBLE columns become
``DOUBLE(asdecimal=True)`` and come back as ``Decimal`` rounded to 10 places (pitfall 9). Every double
here is ``Double(asdecimal=False)``; the two single-precision columns of the dump
(``structures.volume/volume_pa``) are ``Float`` so that code never mistakes them for exact values.

The definitions carry no MySQL-only options, so the same ``metadata`` serves ``create_all`` on SQLite
(the embedded demo database) and on MySQL/MariaDB; ``sql/schema.sql`` is the byte-faithful DDL used for
MySQL init scripts and is checked against these tables by ``tests/test_ingest_schema.py``.
"""
from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Double,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()


def _d(name: str, nullable: bool = True) -> Column:
    return Column(name, Double(asdecimal=False), nullable=nullable)


def _bool(name: str, nullable: bool) -> Column:
    # tinyint(1) in the dumps; no CHECK constraint so SQLite accepts what MySQL accepts.
    return Column(name, Boolean(create_constraint=False), nullable=nullable)


elements = Table(
    "elements", metadata,
    Column("z", Integer, nullable=False),
    Column("name", String(20), nullable=False),
    Column("symbol", String(9), primary_key=True),
    Column("group", Integer, nullable=False),
    Column("period", Integer, nullable=False),
    _d("mass", False), _d("density", False), _d("volume", False),
    Column("atomic_radii", Integer, nullable=False),
    Column("van_der_waals_radii", Integer, nullable=False),
    Column("covalent_radii", Integer, nullable=False),
    _d("melt", False), _d("boil", False), _d("specific_heat", False), _d("electronegativity", False),
    _d("first_ionization_energy", False),
    Column("s_elec", Integer, nullable=False), Column("p_elec", Integer, nullable=False),
    Column("d_elec", Integer, nullable=False), Column("f_elec", Integer, nullable=False),
    _d("production", False),
    _bool("radioactive", False),
    Column("scattering_factors", Text),
    Column("HHI_P", Float(asdecimal=False), server_default="0"),
    Column("HHI_R", Float(asdecimal=False), server_default="0"),
)

compositions = Table(
    "compositions", metadata,
    Column("formula", String(255), primary_key=True),
    Column("generic", String(255)),
    Column("ntypes", Integer),
    _d("mass"), _d("meidema"),
    Column("structure_id", Integer, index=False),
    Column("element_list", String(255)),
    Index("compositions_structure_id", "structure_id"),
)

fits = Table("fits", metadata, Column("name", String(255), primary_key=True))

prototypes = Table(
    "prototypes", metadata,
    Column("name", String(63), primary_key=True),
    Column("structure_id", Integer),
    Column("composition_id", String(255)),
    Index("prototypes_structure_id", "structure_id"),
    Index("prototypes_composition_id", "composition_id"),
)

spacegroups = Table(
    "spacegroups", metadata,
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("hm", String(30)), Column("hall", String(30)),
    Column("pearson", String(30), nullable=False), Column("schoenflies", String(30), nullable=False),
    Column("lattice_system", String(20), nullable=False),
    _bool("centrosymmetric", False),
)

entries = Table(
    "entries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", String(255), nullable=False),
    Column("label", String(20)),
    Column("duplicate_of_id", Integer, ForeignKey("entries.id", name="fx_entries_duplicate_of")),
    _d("delta_e"), _d("stability"),  # legacy columns of the dump, not read by the ingest
    Column("composition_id", String(255), ForeignKey("compositions.formula", name="fx_entries_composition")),
    Column("reference_id", Integer),
    Column("prototype_id", String(63), ForeignKey("prototypes.name", name="fx_entries_prototype")),
    Column("ntypes", Integer), Column("natoms", Integer),
    UniqueConstraint("path", name="entries_path_uniq"),
    Index("entries_duplicate_of_id", "duplicate_of_id"),
    Index("entries_composition_id", "composition_id"),
    Index("entries_reference_id", "reference_id"),
    Index("entries_prototype_id", "prototype_id"),
)

structures = Table(
    "structures", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("entry_id", Integer, ForeignKey("entries.id", name="fx_structures_entry")),
    Column("reference_id", Integer),
    Column("label", String(63), server_default=""),
    Column("prototype_id", String(63), ForeignKey("prototypes.name", name="fx_structures_prototype")),
    _bool("measured", False),
    Column("composition_id", String(255), ForeignKey("compositions.formula", name="fx_structures_composition")),
    Column("natoms", Integer), Column("nsites", Integer), Column("ntypes", Integer),
    # lattice ROWS are the vectors: a = (x1, x2, x3), b = (y1, y2, y3), c = (z1, z2, z3)
    *[_d(n, False) for n in ("x1", "x2", "x3", "y1", "y2", "y3", "z1", "z2", "z3")],
    *[_d(n, False) for n in ("sxx", "syy", "szz", "sxy", "syz", "szx")],
    Column("spacegroup_id", Integer, ForeignKey("spacegroups.number", name="fx_structures_spacegroup")),
    *[_d(n) for n in ("energy", "energy_pa", "magmom", "magmom_pa", "delta_e", "meta_stability")],
    Column("fit_id", String(255), ForeignKey("fits.name", name="fx_structures_fit")),
    Column("volume", Float(asdecimal=False)), Column("volume_pa", Float(asdecimal=False)),  # FLOAT in the dump
    Column("coords", Text),
    Index("structures_entry_id", "entry_id"),
    Index("structures_reference_id", "reference_id"),
    Index("structures_prototype_id", "prototype_id"),
    Index("structures_composition_id", "composition_id"),
    Index("structures_spacegroup_id", "spacegroup_id"),
    Index("structures_fit_id", "fit_id"),
)

atoms = Table(
    "atoms", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("structure_id", Integer, ForeignKey("structures.id", name="fx_atoms_structure")),
    Column("site_id", Integer),
    Column("element_id", String(9), ForeignKey("elements.symbol", name="fx_atoms_element")),  # a SYMBOL
    Column("ox", Integer),
    _d("x", False), _d("y", False), _d("z", False),  # fractional coordinates
    _d("fx"), _d("fy"), _d("fz"), _d("magmom"), _d("charge"), _d("volume"),
    _d("occupancy", False),
    Column("wyckoff_id", Integer),
    Index("atoms_structure_id", "structure_id"),
    Index("atoms_site_id", "site_id"),
    Index("atoms_element_id", "element_id"),
    Index("atoms_wyckoff_id", "wyckoff_id"),
)

calculations = Table(
    "calculations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("configuration", String(15)),
    Column("label", String(63), nullable=False),
    Column("entry_id", Integer, ForeignKey("entries.id", name="fx_calculations_entry")),
    Column("path", String(255)),
    Column("composition_id", String(255), ForeignKey("compositions.formula", name="fx_calculations_composition")),
    Column("natoms", Integer),
    Column("input_id", Integer, ForeignKey("structures.id", name="fx_calculations_input")),
    Column("settings", Text),
    Column("output_id", Integer, ForeignKey("structures.id", name="fx_calculations_output")),
    _d("energy"), _d("energy_pa"), _d("magmom"), _d("magmom_pa"),
    Column("dos_id", Integer),
    _d("band_gap"), _d("irreducible_kpoints"),
    Column("attempt", Integer), Column("nsteps", Integer),
    _bool("converged", True),
    _d("runtime"),
    Index("calculations_configuration", "configuration"),
    Index("calculations_entry_id", "entry_id"),
    Index("calculations_path", "path"),
    Index("calculations_composition_id", "composition_id"),
    Index("calculations_input_id", "input_id"),
    Index("calculations_output_id", "output_id"),
    Index("calculations_dos_id", "dos_id"),
)

formation_energies = Table(
    "formation_energies", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("composition_id", String(255), ForeignKey("compositions.formula", name="fx_fe_composition")),
    Column("entry_id", Integer, ForeignKey("entries.id", name="fx_fe_entry")),
    Column("calculation_id", Integer, ForeignKey("calculations.id", name="fx_fe_calculation")),
    Column("description", String(20)),
    Column("fit_id", String(255), ForeignKey("fits.name", name="fx_fe_fit")),
    _d("stability"), _d("delta_e"),
    Index("formation_energies_composition_id", "composition_id"),
    Index("formation_energies_entry_id", "entry_id"),
    Index("formation_energies_calculation_id", "calculation_id"),
    Index("formation_energies_fit_id", "fit_id"),
)

meta_data = Table(
    "meta_data", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("type", String(15), nullable=False),
    Column("value", Text),
)

entries_meta_data = Table(
    "entries_meta_data", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("entry_id", Integer, ForeignKey("entries.id", name="fx_emd_entry"), nullable=False),
    Column("metadata_id", Integer, ForeignKey("meta_data.id", name="fx_emd_metadata"), nullable=False),
    UniqueConstraint("entry_id", "metadata_id", name="entries_meta_data_uniq"),
    Index("entries_meta_data_metadata_id", "metadata_id"),
)

TABLES = tuple(metadata.sorted_tables)
"""All tables in dependency order (parents first)."""
