"""The marker `headct synth` writes into every file it makes, so ingest can tell synthetic data from an export
and allow the public demo pseudonym key for it alone (headct/data/identity.py, headct/data/guards.py).

DICOM: a private block in the odd group 0x0011, creator `CREATOR`, element `ELEMENT` (0011,1001) LO holding
`VALUE`. NIfTI: the header's `descrip` equal to `VALUE`. Not a security boundary: anyone can write it on purpose;
it stops the accident of real data pseudonymised under a public key.
"""

GROUP = 0x0011
CREATOR = "HEADCT SYNTH"
ELEMENT = 0x01
VALUE = "headct synth: synthetic data, no patient"  # LO (<= 64 characters); NIfTI descrip (<= 80)
