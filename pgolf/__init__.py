"""pgolf: a DVC pipeline for Parameter Golf. Library code only; stages live in `stages/`."""
