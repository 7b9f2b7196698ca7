-- OQMD (qmdb) tables read by `cgnn ingest`, faithful to the real MySQL dumps: table and column names,
-- SQL types (FLOAT structures.volume/volume_pa, varchar foreign keys to compositions/fits/prototypes/
-- elements), NULL rules without DB defaults, the legacy columns (entries.delta_e/stability,
-- structures.fit_id/coords) and the indexes (none on calculations.label/converged).
-- Source: ../shared/docs/oqmd-schema.md sections 1 and 5.
--
-- Used three ways:
--   * docker-compose: ./sql is /docker-entrypoint-initdb.d, run in alphabetical order inside
--     MYSQL_DATABASE (schema.sql, then seed_elements.sql); no CREATE DATABASE / USE here on purpose;
--   * `cgnn db init --db mysql+pymysql://...` (statement by statement; IF NOT EXISTS => re-runnable);
--   * the MariaDB tests. SQLite gets the same tables from ingest/tables.py (metadata.create_all).
-- A real dump (`zcat qmdb__v1_X__*.sql.gz | mysql qmdb`) drops and recreates these tables itself.
SET FOREIGN_KEY_CHECKS = 0;

CREATE TABLE IF NOT EXISTS `elements` (
  `z` int NOT NULL, `name` varchar(20) NOT NULL, `symbol` varchar(9) NOT NULL,
  `group` int NOT NULL, `period` int NOT NULL, `mass` double NOT NULL, `density` double NOT NULL,
  `volume` double NOT NULL, `atomic_radii` int NOT NULL, `van_der_waals_radii` int NOT NULL,
  `covalent_radii` int NOT NULL, `melt` double NOT NULL, `boil` double NOT NULL,
  `specific_heat` double NOT NULL, `electronegativity` double NOT NULL,
  `first_ionization_energy` double NOT NULL, `s_elec` int NOT NULL, `p_elec` int NOT NULL,
  `d_elec` int NOT NULL, `f_elec` int NOT NULL, `production` double NOT NULL,
  `radioactive` tinyint(1) NOT NULL, `scattering_factors` longtext,
  `HHI_P` float DEFAULT 0, `HHI_R` float DEFAULT 0,
  PRIMARY KEY (`symbol`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `compositions` (
  `formula` varchar(255) NOT NULL, `generic` varchar(255) DEFAULT NULL, `ntypes` int DEFAULT NULL,
  `mass` double DEFAULT NULL, `meidema` double DEFAULT NULL, `structure_id` int DEFAULT NULL,
  `element_list` varchar(255) DEFAULT NULL,
  PRIMARY KEY (`formula`), KEY `compositions_structure_id` (`structure_id`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `fits` (`name` varchar(255) NOT NULL, PRIMARY KEY (`name`))
  ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `prototypes` (
  `name` varchar(63) NOT NULL, `structure_id` int DEFAULT NULL, `composition_id` varchar(255) DEFAULT NULL,
  PRIMARY KEY (`name`), KEY `prototypes_structure_id` (`structure_id`),
  KEY `prototypes_composition_id` (`composition_id`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `spacegroups` (
  `number` int NOT NULL, `hm` varchar(30) DEFAULT NULL, `hall` varchar(30) DEFAULT NULL,
  `pearson` varchar(30) NOT NULL, `schoenflies` varchar(30) NOT NULL,
  `lattice_system` varchar(20) NOT NULL, `centrosymmetric` tinyint(1) NOT NULL,
  PRIMARY KEY (`number`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `entries` (
  `id` int NOT NULL AUTO_INCREMENT, `path` varchar(255) NOT NULL, `label` varchar(20) DEFAULT NULL,
  `duplicate_of_id` int DEFAULT NULL,
  `delta_e` double DEFAULT NULL, `stability` double DEFAULT NULL,          -- legacy (dump only)
  `composition_id` varchar(255) DEFAULT NULL, `reference_id` int DEFAULT NULL,
  `prototype_id` varchar(63) DEFAULT NULL, `ntypes` int DEFAULT NULL, `natoms` int DEFAULT NULL,
  PRIMARY KEY (`id`), UNIQUE KEY `entries_path_uniq` (`path`),
  KEY `entries_duplicate_of_id` (`duplicate_of_id`), KEY `entries_composition_id` (`composition_id`),
  KEY `entries_reference_id` (`reference_id`), KEY `entries_prototype_id` (`prototype_id`),
  CONSTRAINT `fx_entries_duplicate_of` FOREIGN KEY (`duplicate_of_id`) REFERENCES `entries` (`id`),
  CONSTRAINT `fx_entries_composition` FOREIGN KEY (`composition_id`) REFERENCES `compositions` (`formula`),
  CONSTRAINT `fx_entries_prototype` FOREIGN KEY (`prototype_id`) REFERENCES `prototypes` (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `structures` (
  `id` int NOT NULL AUTO_INCREMENT, `entry_id` int DEFAULT NULL, `reference_id` int DEFAULT NULL,
  `label` varchar(63) DEFAULT '', `prototype_id` varchar(63) DEFAULT NULL, `measured` tinyint(1) NOT NULL,
  `composition_id` varchar(255) DEFAULT NULL,
  `natoms` int DEFAULT NULL, `nsites` int DEFAULT NULL, `ntypes` int DEFAULT NULL,
  `x1` double NOT NULL, `x2` double NOT NULL, `x3` double NOT NULL,      -- vector a
  `y1` double NOT NULL, `y2` double NOT NULL, `y3` double NOT NULL,      -- vector b
  `z1` double NOT NULL, `z2` double NOT NULL, `z3` double NOT NULL,      -- vector c
  `sxx` double NOT NULL, `syy` double NOT NULL, `szz` double NOT NULL,
  `sxy` double NOT NULL, `syz` double NOT NULL, `szx` double NOT NULL,
  `spacegroup_id` int DEFAULT NULL,
  `energy` double DEFAULT NULL, `energy_pa` double DEFAULT NULL, `magmom` double DEFAULT NULL,
  `magmom_pa` double DEFAULT NULL, `delta_e` double DEFAULT NULL, `meta_stability` double DEFAULT NULL,
  `fit_id` varchar(255) DEFAULT NULL,                                      -- legacy (dump only)
  `volume` float DEFAULT NULL, `volume_pa` float DEFAULT NULL,             -- FLOAT in the dump
  `coords` longtext,                                                       -- legacy (dump only)
  PRIMARY KEY (`id`),
  KEY `structures_entry_id` (`entry_id`), KEY `structures_reference_id` (`reference_id`),
  KEY `structures_prototype_id` (`prototype_id`), KEY `structures_composition_id` (`composition_id`),
  KEY `structures_spacegroup_id` (`spacegroup_id`), KEY `structures_fit_id` (`fit_id`),
  CONSTRAINT `fx_structures_entry` FOREIGN KEY (`entry_id`) REFERENCES `entries` (`id`),
  CONSTRAINT `fx_structures_composition` FOREIGN KEY (`composition_id`) REFERENCES `compositions` (`formula`),
  CONSTRAINT `fx_structures_prototype` FOREIGN KEY (`prototype_id`) REFERENCES `prototypes` (`name`),
  CONSTRAINT `fx_structures_spacegroup` FOREIGN KEY (`spacegroup_id`) REFERENCES `spacegroups` (`number`),
  CONSTRAINT `fx_structures_fit` FOREIGN KEY (`fit_id`) REFERENCES `fits` (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `atoms` (
  `id` int NOT NULL AUTO_INCREMENT, `structure_id` int DEFAULT NULL, `site_id` int DEFAULT NULL,
  `element_id` varchar(9) DEFAULT NULL, `ox` int DEFAULT NULL,
  `x` double NOT NULL, `y` double NOT NULL, `z` double NOT NULL,          -- fractional
  `fx` double DEFAULT NULL, `fy` double DEFAULT NULL, `fz` double DEFAULT NULL,
  `magmom` double DEFAULT NULL, `charge` double DEFAULT NULL, `volume` double DEFAULT NULL,
  `occupancy` double NOT NULL, `wyckoff_id` int DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `atoms_structure_id` (`structure_id`), KEY `atoms_site_id` (`site_id`),
  KEY `atoms_element_id` (`element_id`), KEY `atoms_wyckoff_id` (`wyckoff_id`),
  CONSTRAINT `fx_atoms_structure` FOREIGN KEY (`structure_id`) REFERENCES `structures` (`id`),
  CONSTRAINT `fx_atoms_element` FOREIGN KEY (`element_id`) REFERENCES `elements` (`symbol`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `calculations` (
  `id` int NOT NULL AUTO_INCREMENT, `configuration` varchar(15) DEFAULT NULL,
  `label` varchar(63) NOT NULL, `entry_id` int DEFAULT NULL, `path` varchar(255) DEFAULT NULL,
  `composition_id` varchar(255) DEFAULT NULL, `natoms` int DEFAULT NULL, `input_id` int DEFAULT NULL,
  `settings` longtext, `output_id` int DEFAULT NULL,
  `energy` double DEFAULT NULL, `energy_pa` double DEFAULT NULL,
  `magmom` double DEFAULT NULL, `magmom_pa` double DEFAULT NULL, `dos_id` int DEFAULT NULL,
  `band_gap` double DEFAULT NULL, `irreducible_kpoints` double DEFAULT NULL,
  `attempt` int DEFAULT NULL, `nsteps` int DEFAULT NULL, `converged` tinyint(1) DEFAULT NULL,
  `runtime` double DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `calculations_configuration` (`configuration`), KEY `calculations_entry_id` (`entry_id`),
  KEY `calculations_path` (`path`), KEY `calculations_composition_id` (`composition_id`),
  KEY `calculations_input_id` (`input_id`), KEY `calculations_output_id` (`output_id`),
  KEY `calculations_dos_id` (`dos_id`),
  CONSTRAINT `fx_calculations_entry` FOREIGN KEY (`entry_id`) REFERENCES `entries` (`id`),
  CONSTRAINT `fx_calculations_composition` FOREIGN KEY (`composition_id`) REFERENCES `compositions` (`formula`),
  CONSTRAINT `fx_calculations_input` FOREIGN KEY (`input_id`) REFERENCES `structures` (`id`),
  CONSTRAINT `fx_calculations_output` FOREIGN KEY (`output_id`) REFERENCES `structures` (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE IF NOT EXISTS `formation_energies` (
  `id` int NOT NULL AUTO_INCREMENT, `composition_id` varchar(255) DEFAULT NULL,
  `entry_id` int DEFAULT NULL, `calculation_id` int DEFAULT NULL, `description` varchar(20) DEFAULT NULL,
  `fit_id` varchar(255) DEFAULT NULL, `stability` double DEFAULT NULL, `delta_e` double DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `formation_energies_composition_id` (`composition_id`), KEY `formation_energies_entry_id` (`entry_id`),
  KEY `formation_energies_calculation_id` (`calculation_id`), KEY `formation_energies_fit_id` (`fit_id`),
  CONSTRAINT `fx_fe_calculation` FOREIGN KEY (`calculation_id`) REFERENCES `calculations` (`id`),
  CONSTRAINT `fx_fe_composition` FOREIGN KEY (`composition_id`) REFERENCES `compositions` (`formula`),
  CONSTRAINT `fx_fe_entry` FOREIGN KEY (`entry_id`) REFERENCES `entries` (`id`),
  CONSTRAINT `fx_fe_fit` FOREIGN KEY (`fit_id`) REFERENCES `fits` (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

-- optional: keywords such as 'icsd'
CREATE TABLE IF NOT EXISTS `meta_data` (
  `id` int NOT NULL AUTO_INCREMENT, `type` varchar(15) NOT NULL, `value` text, PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;
CREATE TABLE IF NOT EXISTS `entries_meta_data` (
  `id` int NOT NULL AUTO_INCREMENT, `entry_id` int NOT NULL, `metadata_id` int NOT NULL,
  PRIMARY KEY (`id`), UNIQUE KEY `entries_meta_data_uniq` (`entry_id`,`metadata_id`),
  KEY `entries_meta_data_metadata_id` (`metadata_id`),
  CONSTRAINT `fx_emd_entry` FOREIGN KEY (`entry_id`) REFERENCES `entries` (`id`),
  CONSTRAINT `fx_emd_metadata` FOREIGN KEY (`metadata_id`) REFERENCES `meta_data` (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

SET FOREIGN_KEY_CHECKS = 1;
