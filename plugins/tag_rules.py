"""Tag rules as data: the default blacklist and the categories the trigger pruner works with.

Every rule is written for canonical Danbooru tags (``_tagging.tag_key``): lower case, underscores. A
category is a set of exact tags plus regular expressions (matched against the whole tag). The
categories follow Danbooru's own tag groups (``tag_group:hair_color``, ``hair_styles``,
``eyes_tags``, ``attire``, ``footwear``...) and the pruning advice of the guides:

* a character trigger absorbs hair colour, length and style, eye colour and shape, skin, make-up
  and signature traits (ahoge, fangs, freckles, animal ears...), and the count of people (1girl);
* an outfit trigger absorbs the parts of the outfit (``outfit``, ``accessory``);
* breast size is never pruned, and footwear is never folded into an outfit trigger (``KEEP``).

``categories_of(tag)`` says which categories a tag belongs to; ``lorakit triggers --help`` lists
the category names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Colour words Danbooru uses in tags such as blue_eyes, aqua_hair, light_brown_hair, red_skirt.
COLOURS = (
    "aqua", "black", "blonde", "blue", "brown", "green", "grey", "gray", "orange", "pink", "purple",
    "red", "silver", "white", "yellow", "lavender", "violet", "gold", "golden", "beige", "maroon",
    "teal", "cyan", "magenta", "platinum_blonde", "strawberry_blonde", "dirty_blonde", "sky_blue",
    "navy_blue", "rainbow", "multicolored", "two-tone", "gradient", "transparent", "light", "dark",
)
_COLOUR = "(?:(?:light|dark|pale|bright|deep)_)?(?:" + "|".join(re.escape(c) for c in COLOURS) + ")"


@dataclass(frozen=True)
class Category:
    """One group of tags: ``exact`` names and ``patterns`` (regular expressions over the whole tag)."""

    name: str
    description: str
    exact: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()

    def __contains__(self, tag: str) -> bool:
        if tag in self.exact:
            return True
        return any(p.fullmatch(tag) for p in _compiled(self.patterns))


@lru_cache(maxsize=None)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p) for p in patterns)


def _cat(name: str, description: str, exact=(), patterns=()) -> Category:
    return Category(name, description, frozenset(exact), tuple(patterns))


# Garments and worn things: a tag is an outfit part when it is one of these words, or ends with
# ``_<word>`` (``red_skirt``, ``frilled_ascot``, ``detached_sleeves``, ``sailor_collar``); hair things
# (``hair_bow``, ``hair_ribbon``) are ``hair_accessory`` instead.
GARMENTS = (
    "shirt", "t-shirt", "blouse", "skirt", "miniskirt", "dress", "sundress", "gown", "jacket",
    "coat", "trench_coat", "overcoat", "raincoat", "sleeves", "gloves", "mittens", "ribbon", "bow",
    "bowtie", "necktie", "tie", "vest", "sweater", "hoodie", "cardigan", "blazer", "uniform",
    "serafuku", "kimono", "yukata", "obi", "hakama", "apron", "cape", "capelet", "cloak", "scarf",
    "shawl", "belt", "pants", "trousers", "jeans", "shorts", "leotard", "bodysuit", "swimsuit",
    "bikini", "thighhighs", "pantyhose", "kneehighs", "socks", "leggings", "legwear", "collar",
    "choker", "ascot", "neckerchief", "frills", "lace", "buttons", "zipper", "pocket", "hat", "cap",
    "beret", "hood", "headwear", "headdress", "headband", "crown", "tiara", "circlet",
    "veil", "armor", "pauldrons", "gauntlets", "breastplate", "gorget", "sash", "corset",
    "camisole", "tank_top", "crop_top", "tube_top", "halterneck", "bra", "panties", "underwear",
    "lingerie", "garter_belt", "garter_straps", "overalls", "jumpsuit", "robe", "tabard", "habit",
    "poncho", "wristband", "wrist_cuffs", "armband", "arm_warmers", "leg_warmers", "epaulettes",
    "aiguillette", "brooch", "badge", "emblem", "suspenders", "harness", "qipao", "cheongsam",
    "hanfu", "maid", "nun", "sailor_collar", "detached_collar", "neck_ribbon",
    "clothes", "clothing", "outfit", "costume", "attire", "trim", "cutout", "print",
)
_GARMENT = "(?:" + "|".join(re.escape(g) for g in GARMENTS) + ")"
# Tags that say what happens to a garment (open_jacket, holding_hat, wet_clothes) are not parts of
# an outfit; hair things (hair_bow) are hair accessories.
_NOT_A_STATE = ("(?!(?:hair|open|wet|torn|unbuttoned|unzipped|untied|removing|adjusting|holding|no|"
                "partially|lifted|pulled|undone|loose|clothes|shirt|skirt)_)")

FOOTWEAR_WORDS = (
    "shoes", "boots", "high_heels", "heels", "sandals", "sneakers", "loafers", "slippers",
    "mary_janes", "pumps", "footwear", "geta", "zouri", "okobo", "clogs", "flats", "stilettos",
    "uwabaki", "thigh_boots", "knee_boots", "ankle_boots", "platform_footwear",
)
_FOOTWEAR = "(?:" + "|".join(re.escape(w) for w in FOOTWEAR_WORDS) + ")"

CATEGORIES: dict[str, Category] = {c.name: c for c in [
    _cat("hair_color", "hair colour (black_hair, two-tone_hair, streaked_hair)",
         exact={"multicolored_hair", "two-tone_hair", "streaked_hair", "gradient_hair", "colored_inner_hair",
                "split-color_hair", "colored_tips", "rainbow_hair", "roots_(hair)"},
         patterns=[_COLOUR + r"_hair", _COLOUR + r"_(?:streaks|hair_streak)", r"(?:.+_)?highlights"]),
    _cat("hair_length", "hair length (short_hair, very_long_hair)",
         exact={"very_short_hair", "short_hair", "medium_hair", "long_hair", "very_long_hair",
                "absurdly_long_hair", "big_hair", "bald"}),
    _cat("hair_style", "hairstyle (ponytail, twintails, braid, bangs, sidelocks)",
         exact={"ponytail", "twintails", "braid", "hair_bun", "double_bun", "bangs", "blunt_bangs",
                "swept_bangs", "parted_bangs", "asymmetrical_bangs", "crossed_bangs", "hair_between_eyes",
                "sidelocks", "hair_intakes", "hair_flaps", "drill_hair", "twin_drills", "hime_cut",
                "bob_cut", "wavy_hair", "curly_hair", "straight_hair", "messy_hair", "hair_over_one_eye",
                "hair_over_eyes", "hair_over_shoulder", "antenna_hair", "two_side_up", "one_side_up",
                "hair_up", "hair_down", "tied_hair", "low-tied_long_hair", "hair_rings", "hair_slicked_back",
                "pompadour", "afro", "dreadlocks", "mohawk", "undercut", "spiked_hair", "hair_spread_out",
                "single_hair_bun", "side_bun", "hair_tubes", "quad_tails", "bowl_cut", "pixie_cut",
                "shaved_head", "buzz_cut", "crew_cut", "flipped_hair", "hair_pulled_back",
                "long_bangs", "short_bangs", "choppy_bangs", "arched_bangs", "hair_strand"},
         patterns=[r"(?:.+_)?ponytails?", r"(?:.+_)?twintails", r"(?:.+_)?braids?", r"(?:.+_)?hair_buns?",
                   r"(?:twin|side|single|quad)_drills?", r"(?:.+_)?bangs"]),
    _cat("hair_accessory", "hair ornaments (hair_ornament, hairclip, hair_ribbon, hair_bow)",
         exact={"hair_ornament", "hairclip", "hair_flower", "hair_ribbon", "hair_bow", "hairband", "hairpin",
                "hair_bobbles", "hair_tie", "scrunchie", "hair_scrunchie", "kanzashi", "hair_stick",
                "hairpods", "hair_bell", "hair_beads", "hair_ornament"},
         patterns=[r".+_hair_ornament", r".+_hairclip", r".+_hairband", r"hair_.+_ornament",
                   _COLOUR + r"_hair_(?:ribbon|bow|flower|scrunchie)"]),
    _cat("eye_color", "eye colour (blue_eyes, heterochromia)",
         exact={"heterochromia", "multicolored_eyes", "gradient_eyes", "rainbow_eyes"},
         patterns=[_COLOUR + r"_eyes", _COLOUR + r"_pupils", _COLOUR + r"_sclera"]),
    _cat("eye_shape", "eye shape and pupils (tsurime, slit_pupils, symbol-shaped_pupils)",
         exact={"tsurime", "tareme", "jitome", "sanpaku", "slit_pupils", "symbol-shaped_pupils", "ringed_eyes",
                "empty_eyes", "no_pupils", "constricted_pupils", "star-shaped_pupils", "heart-shaped_pupils",
                "long_eyelashes", "thick_eyelashes", "colored_eyelashes", "eyelashes", "thick_eyebrows",
                "short_eyebrows", "x-shaped_pupils", "cross-shaped_pupils", "diamond-shaped_pupils",
                "horizontal_pupils", "sparkling_eyes", "glowing_eyes", "mismatched_pupils"}),
    _cat("skin", "skin colour and texture (dark_skin, pale_skin, tan, tanlines)",
         exact={"dark_skin", "dark-skinned_female", "dark-skinned_male", "pale_skin", "tan", "tanlines",
                "tanned", "colored_skin"},
         patterns=[_COLOUR + r"_skin", r".+-skinned_(?:female|male|other)"]),
    _cat("makeup", "make-up (lipstick, eyeshadow, eyeliner, nail_polish)",
         exact={"makeup", "lipstick", "eyeshadow", "eyeliner", "mascara", "nail_polish", "lip_gloss", "blush_(makeup)",
                "eye_shadow", "facepaint", "face_paint", "rouge_(makeup)"},
         patterns=[_COLOUR + r"_(?:lips|lipstick|eyeshadow|eyeliner|nails|nail_polish)", r"(?:.+_)?nail_polish"]),
    _cat("signature", "signature traits (ahoge, fang, freckles, mole_under_eye, animal_ears, tail, horns, halo)",
         exact={"ahoge", "huge_ahoge", "heart_ahoge", "fang", "fangs", "skin_fang", "skin_fangs", "fang_out",
                "sharp_teeth", "freckles", "mole", "beauty_mark", "pointy_ears", "long_pointy_ears", "elf",
                "animal_ears", "tail", "horns", "wings", "halo", "scar", "tattoo", "facial_mark",
                "whisker_markings", "forehead_mark", "facial_tattoo", "bandaid_on_face", "eyepatch",
                "mechanical_arms", "prosthesis", "heterochromia", "animal_ear_fluff", "kemonomimi_mode",
                "third_eye", "extra_eyes", "extra_ears", "antennae", "tentacle_hair", "star_(symbol)_on_face"},
         patterns=[r"mole_(?:under|on|above)_.+", r"(?!covering_|hands?_|fingers?_|holding_|pulling_|grabbing_).+_ears", r".+_tail", r".+_tails", r".+_horns?",
                   r".+_wings", r"scars?_(?:on|across)_.+", r".+_scar", r".+_tattoo", r"tattoo_on_.+",
                   r".+_mark(?:ing)?s?_on_.+", r".+_halo"]),
    _cat("body", "body shape (thick_thighs, wide_hips, muscular, abs, petite)",
         exact={"thick_thighs", "wide_hips", "narrow_waist", "muscular", "muscular_female", "muscular_male",
                "abs", "toned", "toned_female", "toned_male", "curvy", "petite", "plump", "chubby", "fat",
                "skinny", "slim", "tall", "tall_female", "shortstack", "mature_female", "mature_male",
                "loli", "shota", "child", "old", "old_woman", "old_man", "long_legs", "thigh_gap",
                "broad_shoulders", "large_pectorals", "pectorals"}),
    _cat("breasts", "breast size (flat_chest, small_breasts ... gigantic_breasts): kept by default",
         exact={"flat_chest", "small_breasts", "medium_breasts", "large_breasts", "huge_breasts", "gigantic_breasts",
                "breasts", "sagging_breasts", "perky_breasts"}),
    _cat("people", "count of people (1girl, 2girls, multiple_boys)",
         exact={"multiple_girls", "multiple_boys", "multiple_others", "6+girls", "6+boys", "6+others"},
         patterns=[r"\d+(?:girls?|boys?|others?)"]),
    _cat("footwear", "footwear (boots, high_heels, shoes): never folded into an outfit trigger",
         exact=set(FOOTWEAR_WORDS),
         patterns=[r".+_" + _FOOTWEAR]),
    _cat("outfit", "outfit parts (shirt, red_skirt, detached_sleeves, frilled_ascot, plaid, school_uniform)",
         exact=set(GARMENTS) | {"plaid", "striped", "polka_dot", "checkered", "houndstooth", "argyle",
                                "long_sleeves", "short_sleeves", "sleeveless", "puffy_sleeves", "wide_sleeves",
                                "juliet_sleeves", "bare_shoulders", "off_shoulder", "strapless", "backless_outfit",
                                "cleavage_cutout", "clothing_cutout", "center_frills", "high_collar", "turtleneck",
                                "military", "military_uniform", "school_uniform", "gym_uniform", "sportswear",
                                "armlet", "bracer", "vambraces", "greaves", "tassel", "pom_pom_(clothes)",
                                "fur_trim", "lace_trim", "gold_trim", "frilled_sleeves", "layered_sleeves",
                                "zettai_ryouiki", "midriff", "navel_cutout", "side_slit", "pelvic_curtain"},
         patterns=[_NOT_A_STATE + r".+_" + _GARMENT, r"frilled_.+", r"(?:.+_)?sleeves(?:_.+)?", r".+_trim", r".+_print",
                   r".+_cutout", r"(?:.+_)?uniform"]),
    _cat("accessory", "worn accessories (glasses, earrings, necklace, jewelry, gloves)",
         exact={"glasses", "eyewear", "sunglasses", "monocle", "goggles", "earrings", "necklace", "pendant",
                "jewelry", "bracelet", "ring", "wedding_ring", "anklet", "piercing", "ear_piercing", "mask",
                "bandana", "headphones", "headset", "hair_accessory", "watch", "wristwatch", "bangle"},
         patterns=[r".+-framed_eyewear", r".+_eyewear", r".+-rimmed_eyewear", r".+_earrings",
                   r".+_necklace", r".+_bracelet", r".+_piercing", r".+_goggles", r".+_mask"]),
]}
"""All categories by name."""

CHARACTER_CATEGORIES = {
    "fluid": (),
    "semi-static": ("hair_color", "hair_length", "hair_style", "eye_color", "eye_shape", "skin", "makeup",
                    "signature", "people"),
    "static": ("hair_color", "hair_length", "hair_style", "hair_accessory", "eye_color", "eye_shape", "skin",
               "makeup", "signature", "body", "people"),
}
"""What a character trigger absorbs in each pruning mode (style mode removes every tag)."""

OUTFIT_CATEGORIES = ("outfit", "accessory")
"""What an outfit (concept) trigger absorbs, except in fluid mode."""

KEEP_CATEGORIES = ("breasts", "footwear")
"""Never pruned unless the user says otherwise: breast size (users complain) and footwear."""

# Tags the guides call useless (meme, parody, uncensored, redraw challenges) plus booru bookkeeping
# tags that describe the post, not the picture. (Namespaced tags such as artist:x are dropped too,
# by ``_tagging.is_namespaced``.)
DEFAULT_BLACKLIST = (
    "meme", "parody", "uncensored", "shiny_skin", "*_(meme)", "*_challenge", "one-hour_drawing_challenge",
    "*_redraw_challenge_(meme)", "commentary", "commentary_request", "english_commentary",
    "partial_commentary", "symbol-only_commentary", "translated", "translation_request",
    "check_translation", "bad_id", "bad_pixiv_id", "bad_twitter_id", "bad_tumblr_id",
    "bad_deviantart_id", "bad_link", "md5_mismatch", "tagme", "artist_request", "character_request",
    "copyright_request", "source_request", "third-party_edit", "duplicate", "highres", "absurdres",
    "incredibly_absurdres", "resized", "upscaled", "revision", "paid_reward_available",
)
"""The built-in blacklist (``*`` is a wildcard). Extend it with the tags step's ``blacklist``."""

# A generic tag is dropped when a more specific one in the same caption ends with ``_<generic>``
# (``bow`` with ``black_bow``). Specific tags that deny the generic one do not count.
NOT_SPECIFIC_PREFIXES = ("no_", "without_", "removing_", "unworn_")


def categories_of(tag: str) -> set[str]:
    """The names of the categories canonical ``tag`` belongs to."""
    return {name for name, cat in CATEGORIES.items() if tag in cat}


def check_categories(names) -> None:
    """Raise ValueError naming an unknown category (for parameter validation)."""
    for n in names:
        if n not in CATEGORIES:
            raise ValueError(f"category names from: {', '.join(CATEGORIES)} ('{n}' is not one)")
