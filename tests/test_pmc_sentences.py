from llavamed.data.pmc.sentences import (
    is_range_gap,
    label_number,
    numbers_in_citation,
    sentences,
    trailing_is_range,
    trailing_numbers,
)


def test_no_split_at_abbreviations_and_decimals():
    text = (
        "As shown in Fig. 3 and Figs. 4A, the lesion (approx. 2.5 cm) was reported by Smith et al. "
        "(2019), e.g. on CT, i.e. twice, vs. 3.1 cm before. The next sentence starts here! "
        'And "a quoted one." Dr. J. Smith agreed. Final'
    )
    assert sentences(text) == [
        "As shown in Fig. 3 and Figs. 4A, the lesion (approx. 2.5 cm) was reported by Smith et al. "
        "(2019), e.g. on CT, i.e. twice, vs. 3.1 cm before.",
        "The next sentence starts here!",
        'And "a quoted one."',
        "Dr. J. Smith agreed.",
        "Final",
    ]


def test_split_needs_capital_or_digit_after():
    assert sentences("It was small. the next word is lower case.") == [
        "It was small. the next word is lower case."
    ]
    assert sentences("Done (Fig. 1). 2 patients died.") == ["Done (Fig. 1).", "2 patients died."]


def test_sentences_around_citations_split_where_they_end():
    # A gene or molecule name, or a Greek letter, starts a sentence in lower case.
    assert sentences("Expression rose (Fig. 1). mRNA levels fell. p53 was lost. α-SMA rose.") == [
        "Expression rose (Fig. 1).",
        "mRNA levels fell.",
        "p53 was lost.",
        "α-SMA rose.",
    ]
    # A panel letter after a figure number is not an initial; "J. Smith" still is.
    assert sentences("Consolidation is seen in Figure 1B. The kidneys were normal.") == [
        "Consolidation is seen in Figure 1B.",
        "The kidneys were normal.",
    ]
    assert len(sentences("As J. Smith showed in 2019.")) == 1
    # "min." and "sec." end sentences in methods text.
    assert sentences("Cells were fixed for 10 min. Staining is shown in Fig. 2.") == [
        "Cells were fixed for 10 min.",
        "Staining is shown in Fig. 2.",
    ]
    assert len(sentences("Washed for 30 sec. Staining followed.")) == 2


def test_citation_ranges_and_lists():
    assert numbers_in_citation("Figs. 2–4") == [2, 3, 4]
    assert numbers_in_citation("Figures 2 to 4") == [2, 3, 4]
    assert numbers_in_citation("Fig. 3, 4, 5") == [3, 4, 5]
    assert numbers_in_citation("Figure 2A–C") == [2]  # panels, not figures
    assert numbers_in_citation("Figures 2A-4C") == [2, 3, 4]
    assert numbers_in_citation("Fig. S2") == []  # supplementary
    # eLife: a figure's supplements, source data and videos are numbered on their own.
    assert numbers_in_citation("Figure 4\u2014figure supplement 1") == [4]
    assert numbers_in_citation("Figure 3\u2014figure supplements 1\u20132") == [3]
    assert numbers_in_citation("Figure 2\u2014source data 1") == [2]
    assert trailing_numbers(", 4, 5 and 6. Next") == [4, 5, 6]
    assert trailing_numbers("–4) shows") == [4] and trailing_is_range("–4) shows")
    assert trailing_numbers(" and Table 2") == []
    # a number that counts something after the citation is not a figure
    assert trailing_numbers(", 3 of the 10 patients had") == []
    assert trailing_numbers(", 3 out of 10") == []
    assert trailing_numbers("; 12% of cases") == []
    assert trailing_numbers(", 24 patients") == []
    assert trailing_numbers(", 5mg/kg") == [] and trailing_numbers(", 10min later") == []
    assert trailing_numbers(", 3B and 4") == [3, 4]
    assert trailing_numbers(", 3 and 4 show") == [3, 4]
    assert is_range_gap("\u2013") and is_range_gap(" to ") and not is_range_gap(", ")


def test_label_numbers():
    assert label_number("Figure 3") == 3
    assert label_number("FIG. 12.") == 12
    assert label_number("Figure S2") is None
    assert label_number(None) is None
    assert label_number("FIG 3A") == 3 and label_number("Figure1") == 1
    # Other series number on their own: their numbers are not the main figures'.
    assert label_number("Scheme 1") is None and label_number("Box 2") is None
    assert label_number("Figure 2\u2014figure supplement 1.") is None
    assert label_number("Figure 3\u2014source data 1") is None


def test_a_sentence_ends_after_a_panel_range_or_list():
    # The last panel letter of "1A–C." or "1A,B." is not a person's initial.
    for cite in ("1A\u2013C", "1A-C", "1A,B", "1A, B, C", "2A and C", "1A/B", "1 B"):
        assert sentences(f"Lesions are shown in Figure {cite}. Treatment reduced them.") == [
            f"Lesions are shown in Figure {cite}.",
            "Treatment reduced them.",
        ]
    assert len(sentences("As shown by Smith and J. Jones in 2019.")) == 1
    assert len(sentences("In 2019 J. Smith showed it.")) == 1


def test_a_capital_letter_named_by_the_word_before_it_ends_a_sentence():
    """Neither "stained with H&E." nor "hepatitis B." ends with an initial: the sentence was
    joined to the next one, which cites a figure, and landed in the figure's inline mentions."""
    text = (
        "Sections were stained with H&E. Tumour cells infiltrate the dermis (Fig. 3). "
        "The patient had hepatitis B. Liver biopsy is shown in Fig. 2. See panels A and B. "
        "Cultures grew S. Typhimurium and E. coli. Dr. J. Smith agreed."
    )
    assert sentences(text) == [
        "Sections were stained with H&E.",
        "Tumour cells infiltrate the dermis (Fig. 3).",
        "The patient had hepatitis B.",
        "Liver biopsy is shown in Fig. 2.",
        "See panels A and B.",
        "Cultures grew S. Typhimurium and E. coli.",
        "Dr. J. Smith agreed.",
    ]
