-- The index: patient / study / series / instance, each with the columns C-FIND and QIDO-RS match on
-- (archive/attributes.py) and the level's attributes as DICOM JSON (what queries return).
-- Strings that are matched case-insensitively (PN) are stored lower-cased in *_name columns;
-- dates as YYYYMMDD text and times as HHMMSS.FFFFFF text, so ranges compare as text (PS3.4 C.2.2.2.5).

CREATE TABLE patient (
    pk                     bigserial PRIMARY KEY,
    patient_id             text NOT NULL DEFAULT '',
    issuer_of_patient_id   text NOT NULL DEFAULT '',
    patient_name           text,
    patient_birth_date     text,
    patient_sex            text,
    attrs                  jsonb NOT NULL,
    UNIQUE (patient_id, issuer_of_patient_id)
);
CREATE INDEX patient_name_idx ON patient (patient_name text_pattern_ops);

CREATE TABLE study (
    pk                        bigserial PRIMARY KEY,
    patient_fk                bigint NOT NULL REFERENCES patient (pk),
    study_instance_uid        text NOT NULL UNIQUE,
    study_date                text,
    study_time                text,
    accession_number          text,
    study_id                  text,
    referring_physician_name  text,
    study_description         text,
    attrs                     jsonb NOT NULL,
    created_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX study_patient_idx ON study (patient_fk);
CREATE INDEX study_date_idx ON study (study_date);
CREATE INDEX study_accession_idx ON study (accession_number);

CREATE TABLE series (
    pk                   bigserial PRIMARY KEY,
    study_fk             bigint NOT NULL REFERENCES study (pk),
    series_instance_uid  text NOT NULL UNIQUE,
    modality             text,
    series_number        integer,
    series_description   text,
    series_date          text,
    series_time          text,
    body_part_examined   text,
    institution_name     text,
    pps_start_date       text,
    pps_start_time       text,
    attrs                jsonb NOT NULL
);
CREATE INDEX series_study_idx ON series (study_fk);
CREATE INDEX series_modality_idx ON series (modality);

CREATE TABLE instance (
    pk                    bigserial PRIMARY KEY,
    series_fk             bigint NOT NULL REFERENCES series (pk),
    sop_instance_uid      text NOT NULL UNIQUE,
    sop_class_uid         text NOT NULL,
    instance_number       integer,
    content_date          text,
    content_time          text,
    acquisition_datetime  text,
    transfer_syntax_uid   text NOT NULL,
    -- where the object is: the store's name and its opaque location; the byte offset where the
    -- data set starts (after the PS3.10 preamble and File Meta Information)
    store                 text NOT NULL,
    location              text NOT NULL,
    size                  bigint NOT NULL,
    digest                text NOT NULL,
    dataset_offset        integer NOT NULL,
    attrs                 jsonb NOT NULL,
    metadata              text NOT NULL,   -- DICOM JSON of the whole instance without bulk data
    source                text NOT NULL,   -- e.g. 'dimse:MODALITY_AE' or 'dicomweb'
    created_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instance_series_idx ON instance (series_fk);
CREATE INDEX instance_location_idx ON instance (store, location);

-- Application Entities we send to (C-MOVE destinations)
CREATE TABLE application_entity (
    ae_title  text PRIMARY KEY,
    host      text NOT NULL,
    port      integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One round trip stores one instance: find-or-create patient, study and series, then insert the
-- instance or apply the duplicate policy. Returns the outcome and, when an older object was replaced
-- or a duplicate was not needed, which object the caller must now delete.
--   outcome: 'stored' | 'duplicate' (same SOP Instance UID, same digest) | 'conflict' (other digest,
--   policy reject) | 'replaced' (other digest, policy keep-newest)
CREATE FUNCTION vna_store_instance(
    p_patient_id text, p_issuer text, p_patient_name text, p_birth_date text, p_sex text, p_attrs jsonb,
    st_uid text, st_date text, st_time text, st_accession text, st_id text, st_referring text,
    st_description text, st_attrs jsonb,
    se_uid text, se_modality text, se_number integer, se_description text, se_date text, se_time text,
    se_body_part text, se_institution text, se_pps_date text, se_pps_time text, se_attrs jsonb,
    i_uid text, i_class text, i_number integer, i_content_date text, i_content_time text,
    i_acq_datetime text, i_ts text, i_store text, i_location text, i_size bigint, i_digest text,
    i_offset integer, i_attrs jsonb, i_metadata text, i_source text, policy text,
    OUT outcome text, OUT old_store text, OUT old_location text)
LANGUAGE plpgsql AS $$
DECLARE
    v_patient bigint; v_study bigint; v_series bigint;
    v_old record;
BEGIN
    SELECT pk INTO v_patient FROM patient WHERE patient_id = p_patient_id AND issuer_of_patient_id = p_issuer;
    IF v_patient IS NULL THEN
        INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date, patient_sex, attrs)
        VALUES (p_patient_id, p_issuer, p_patient_name, p_birth_date, p_sex, p_attrs)
        ON CONFLICT DO NOTHING RETURNING pk INTO v_patient;
        IF v_patient IS NULL THEN
            SELECT pk INTO v_patient FROM patient WHERE patient_id = p_patient_id AND issuer_of_patient_id = p_issuer;
        END IF;
    END IF;

    SELECT pk INTO v_study FROM study WHERE study_instance_uid = st_uid;
    IF v_study IS NULL THEN
        INSERT INTO study (patient_fk, study_instance_uid, study_date, study_time, accession_number, study_id,
                           referring_physician_name, study_description, attrs)
        VALUES (v_patient, st_uid, st_date, st_time, st_accession, st_id, st_referring, st_description, st_attrs)
        ON CONFLICT DO NOTHING RETURNING pk INTO v_study;
        IF v_study IS NULL THEN
            SELECT pk INTO v_study FROM study WHERE study_instance_uid = st_uid;
        END IF;
    END IF;

    SELECT pk INTO v_series FROM series WHERE series_instance_uid = se_uid;
    IF v_series IS NULL THEN
        INSERT INTO series (study_fk, series_instance_uid, modality, series_number, series_description, series_date,
                            series_time, body_part_examined, institution_name, pps_start_date, pps_start_time, attrs)
        VALUES (v_study, se_uid, se_modality, se_number, se_description, se_date, se_time, se_body_part,
                se_institution, se_pps_date, se_pps_time, se_attrs)
        ON CONFLICT DO NOTHING RETURNING pk INTO v_series;
        IF v_series IS NULL THEN
            SELECT pk INTO v_series FROM series WHERE series_instance_uid = se_uid;
        END IF;
    END IF;

    LOOP
        SELECT pk, digest, store, location, series_fk INTO v_old FROM instance
        WHERE sop_instance_uid = i_uid FOR UPDATE;
        IF FOUND THEN
            IF v_old.digest = i_digest THEN
                outcome := 'duplicate'; old_store := i_store; old_location := i_location;
                IF v_old.store = i_store AND v_old.location = i_location THEN old_store := NULL; old_location := NULL; END IF;
                RETURN;
            ELSIF policy = 'reject' THEN
                outcome := 'conflict'; old_store := i_store; old_location := i_location;
                RETURN;
            END IF;
            UPDATE instance SET series_fk = v_series, sop_class_uid = i_class, instance_number = i_number,
                content_date = i_content_date, content_time = i_content_time, acquisition_datetime = i_acq_datetime,
                transfer_syntax_uid = i_ts, store = i_store, location = i_location, size = i_size,
                digest = i_digest, dataset_offset = i_offset, attrs = i_attrs, metadata = i_metadata,
                source = i_source, created_at = now()
            WHERE pk = v_old.pk;
            IF v_old.series_fk <> v_series THEN
                PERFORM vna_prune_series(v_old.series_fk);
            END IF;
            outcome := 'replaced'; old_store := v_old.store; old_location := v_old.location;
            RETURN;
        END IF;
        BEGIN
            INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number, content_date,
                content_time, acquisition_datetime, transfer_syntax_uid, store, location, size, digest,
                dataset_offset, attrs, metadata, source)
            VALUES (v_series, i_uid, i_class, i_number, i_content_date, i_content_time, i_acq_datetime, i_ts,
                i_store, i_location, i_size, i_digest, i_offset, i_attrs, i_metadata, i_source);
            outcome := 'stored';
            RETURN;
        EXCEPTION WHEN unique_violation THEN
            -- another association stored the same SOP Instance UID a moment ago: decide against it
        END;
    END LOOP;
END $$;

-- Remove a series left without instances, and its study and patient if they become empty.
CREATE FUNCTION vna_prune_series(s_pk bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE v_study bigint; v_patient bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM instance WHERE series_fk = s_pk) THEN RETURN; END IF;
    DELETE FROM series WHERE pk = s_pk RETURNING study_fk INTO v_study;
    IF v_study IS NULL OR EXISTS (SELECT 1 FROM series WHERE study_fk = v_study) THEN RETURN; END IF;
    DELETE FROM study WHERE pk = v_study RETURNING patient_fk INTO v_patient;
    IF v_patient IS NULL OR EXISTS (SELECT 1 FROM study WHERE patient_fk = v_patient) THEN RETURN; END IF;
    DELETE FROM patient WHERE pk = v_patient;
END $$;

-- Normalised forms of TM and DT text for matching attributes that have no indexed column
-- (the same normalisation archive/instance.py applies to indexed columns, PS3.5 6.2).
CREATE FUNCTION vna_norm_time(t text) RETURNS text IMMUTABLE LANGUAGE sql AS $$
    SELECT CASE WHEN coalesce(t, '') = '' THEN NULL ELSE
        rpad(split_part(replace(t, ':', ''), '.', 1), 6, '0') || '.' ||
        rpad(split_part(replace(t, ':', ''), '.', 2), 6, '0') END $$;

CREATE FUNCTION vna_norm_datetime(t text) RETURNS text IMMUTABLE LANGUAGE sql AS $$
    SELECT CASE WHEN coalesce(t, '') = '' THEN NULL ELSE
        rpad(split_part(regexp_replace(t, '[+-][0-9]{4}$', ''), '.', 1), 14, '0') || '.' ||
        rpad(split_part(regexp_replace(t, '[+-][0-9]{4}$', ''), '.', 2), 6, '0') END $$;
